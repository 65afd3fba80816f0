//! The node-to-node message decoder (`firebrand::fuzzing::cluster_message`): what a node reads
//! from the cluster engine, where anyone who can publish may write. Properties: never panics; a
//! message that decodes re-encodes to one that decodes again.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    firebrand::fuzzing::cluster_message(data);
});
