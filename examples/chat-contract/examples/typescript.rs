//! Prints the chat contract's TypeScript declarations (what `contract.d.ts` holds).
//! `tests/types/run.sh` runs it on a modified copy of this crate to show that the page's type
//! check catches a renamed field.

fn main() {
    print!("{}", firebrand_chat_contract::typescript());
}
