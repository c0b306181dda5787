"""A listening cluster in a process of its own, so that a test can read its peak memory.

Run as ``python -m tests.bounds_listener CLUSTER_ID OPTIONS_JSON`` (from the directory that holds
`tests`): it prints its port, then answers
each line on stdin with one JSON line: "stat" -> {"hwm_kb", "rss_kb", "peers": {id: caches}},
"read" -> the first bytes of its blocks cache (key (CLUSTER_ID, 1)) as hex, "quit" -> exits."""

import json
import sys

from llmdist import BlocksCacheKey, CacheDesc, DataType, LLMDataDist, LLMRole, Placement


def memory_kb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0][2:].lower() + "_kb"] = int(line.split()[1])
    return out


def main() -> None:
    cluster_id = int(sys.argv[1])
    options = {
        "llm.listenIpInfo": "127.0.0.1:0",
        "llm.EnableCacheManager": "1",
        "llm.EnableRemoteCacheAccessible": "1",
        "ge.exec.deviceId": "0",
    }
    options.update(json.loads(sys.argv[2]))
    dd = LLMDataDist(LLMRole.DECODER, cluster_id)
    dd.init(options)
    cache = dd.cache_manager.allocate_blocks_cache(
        CacheDesc(2, [4, 64], DataType.DT_UINT8, Placement.HOST), BlocksCacheKey(cluster_id, 1)
    )
    print(dd.listen_port, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stat":
            node = dd._node
            with node.lock:
                peers = {str(c): len(p.mem.entries) for c, p in node.peers.items()}
            print(json.dumps(dict(memory_kb(), peers=peers)), flush=True)
        elif cmd == "read":
            import ctypes

            print(json.dumps(ctypes.string_at(cache.tensor_addrs[0], 256).hex()), flush=True)
        elif cmd == "quit":
            break
    dd.finalize()


if __name__ == "__main__":
    main()
