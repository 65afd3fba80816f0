// firebrand-server's README quickstart (crates/firebrand-server/README.md), run as written, so that it
// cannot drift: its fenced blocks tagged `quickstart:<name>` are extracted; the files
// (firebrand.toml, mint_token.mjs, mint_token.py, client.mjs) are written to a temp dir and the commands
// (start, client-node, client-python, publish) run there with `sh -c`, with the binary on PATH.
// One change: port 4000 becomes a free port, so that the test never collides with anything.
import {test} from "node:test"
import assert from "node:assert/strict"
import {spawn} from "node:child_process"
import {mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync} from "node:fs"
import {createServer} from "node:net"
import {tmpdir} from "node:os"
import {dirname, join} from "node:path"
import {fileURLToPath} from "node:url"
import {BIN, within} from "./support.mjs"

const here = dirname(fileURLToPath(import.meta.url))
const README = join(here, "..", "..", "crates", "firebrand-server", "README.md")

/** The README's blocks tagged ```<lang> quickstart:<name>, by name. */
function blocks() {
  const text = readFileSync(README, "utf8")
  const out = {}
  for (const m of text.matchAll(/^```[\w-]+ quickstart:(\S+)\n([\s\S]*?)^```$/gm)) {
    assert.ok(!(m[1] in out), `quickstart:${m[1]} appears twice`)
    out[m[1]] = m[2]
  }
  return out
}

const freePort = () => new Promise((resolve) => {
  const s = createServer()
  s.listen(0, "127.0.0.1", () => { const {port} = s.address(); s.close(() => resolve(port)) })
})

/** A command of the quickstart, running: its output so far, and waits on it. */
function run(command, cwd, env) {
  const child = spawn("sh", ["-c", command], {cwd, env, stdio: ["ignore", "pipe", "pipe"]})
  const proc = {child, out: "", err: ""}
  child.stdout.on("data", (d) => { proc.out += d })
  child.stderr.on("data", (d) => { proc.err += d })
  proc.exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)))
  /** Resolves when its stdout contains `text`. */
  proc.prints = (text) => within(new Promise((resolve, reject) => {
    const check = () => { if (proc.out.includes(text)) resolve() }
    child.stdout.on("data", check)
    check()
    proc.exited.then((code) => reject(new Error(`\`${command}\` exited (${code}) without printing ${text}: ${proc.out}${proc.err}`)))
  }), `\`${command}\` to print ${text} (so far: ${JSON.stringify(proc.out + proc.err)})`, 10_000)
  /**
   * SIGTERM to the command that `sh` runs (`sh` then exits with its code), or to `sh` when it
   * runs none; resolves with the exit code.
   */
  proc.stop = () => {
    let children = []
    try { children = readFileSync(`/proc/${child.pid}/task/${child.pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean) } catch {}
    for (const pid of children.length ? children.map(Number) : [child.pid]) {
      try { process.kill(pid, "SIGTERM") } catch {}
    }
    return within(proc.exited, `\`${command}\` to exit`, 15_000)
  }
  return proc
}

test("the README quickstart works as written", async () => {
  const b = blocks()
  for (const name of ["firebrand.toml", "start", "mint_token.mjs", "mint_token.py", "client.mjs", "client-node", "client-python", "publish"]) {
    assert.ok(name in b, `README.md has no block tagged quickstart:${name}`)
  }
  const port = String(await freePort())
  const at = (s) => s.replaceAll("127.0.0.1:4000", `127.0.0.1:${port}`)

  const dir = mkdtempSync(join(tmpdir(), "firebrand-quickstart-"))
  const running = []
  try {
    for (const file of ["firebrand.toml", "mint_token.mjs", "mint_token.py", "client.mjs"]) writeFileSync(join(dir, file), at(b[file]))
    // What `npm install jsonwebtoken phoenix ws` gives, from this suite's lockfile.
    symlinkSync(join(here, "node_modules"), join(dir, "node_modules"))
    // `firebrand-server` and `python3` (the system's, which has PyJWT) first on PATH; no
    // FIREBRAND_* variables, which would override the file.
    const bin = join(dir, "bin")
    mkdirSync(bin)
    symlinkSync(BIN, join(bin, "firebrand-server"))
    symlinkSync("/usr/bin/python3", join(bin, "python3"))
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("FIREBRAND_")))
    env.PATH = `${bin}:${process.env.PATH}`

    const server = run(at(b.start), dir, env)
    running.push(server)
    await server.prints(`listening on 127.0.0.1:${port}`)

    const alice = run(at(b["client-node"]), dir, env)
    const bob = run(at(b["client-python"]), dir, env)
    running.push(alice, bob)
    await alice.prints(`joined {"user":"alice"}`)
    await bob.prints(`joined {"user":"bob"}`)

    const curl = run(at(b.publish), dir, env)
    assert.equal(await within(curl.exited, "curl"), 0, curl.err)
    assert.equal(curl.out.trim(), `{"ok":true}`)
    await alice.prints(`new_msg {"body":"hello"}`)
    await bob.prints(`new_msg {"body":"hello"}`)

    // A client with a bad token sees the socket error the snippet reports.
    const eve = run(`node client.mjs not-a-token`, dir, env)
    running.push(eve)
    await eve.prints("socket error")

    for (const client of [alice, bob, eve]) await client.stop()
    running.length = 1
    assert.equal(await server.stop(), 0, "the server exits 0 on SIGTERM")
    running.length = 0
  } finally {
    for (const p of running) await p.stop().catch(() => {})
    rmSync(dir, {recursive: true, force: true})
  }
})
