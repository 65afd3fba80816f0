"""Server memory per idle joined connection.

Usage: python3 scripts/idle-memory.py N PORT PID
  Opens N WebSocket connections to the conformance app on 127.0.0.1:PORT (source addresses
  127.0.0.2, .3, ... per 20,000), joins each to one of 100 topics, and compares the server
  process PID's VmRSS before and after. Needs `ulimit -n` above N.
Example:
  target/release/conformance --port 4200 & python3 scripts/idle-memory.py 10000 4200 $!
"""
import asyncio, os, sys, json, struct
N = int(sys.argv[1]); PORT = int(sys.argv[2])
def frame(text):
    p = text.encode(); key = b'\x01\x02\x03\x04'
    hdr = bytes([0x81]) + (bytes([0x80|len(p)]) if len(p) < 126 else bytes([0x80|126]) + struct.pack('>H', len(p)))
    return hdr + key + bytes(b ^ key[i % 4] for i, b in enumerate(p))
async def one(i, keep):
    r, w = await asyncio.open_connection('127.0.0.1', PORT, local_addr=(f'127.0.0.{2 + i // 20000}', 0))
    w.write(f"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    await r.readuntil(b'\r\n\r\n')
    w.write(frame(json.dumps(["1","1",f"room:idle{i%100}","phx_join",{}])))
    await r.read(200)
    keep.append((r, w))
def rss(pid):
    for l in open(f'/proc/{pid}/status'):
        if l.startswith('VmRSS'): return int(l.split()[1])
async def main():
    pid = int(sys.argv[3]); keep = []
    before = rss(pid)
    for s in range(0, N, 500):
        await asyncio.gather(*(one(i, keep) for i in range(s, min(N, s + 500))))
    await asyncio.sleep(2)
    after = rss(pid)
    print(f"{N} joined idle connections: server RSS {before} KiB -> {after} KiB = {(after-before)*1024/N:.0f} bytes/connection")
asyncio.run(main())
