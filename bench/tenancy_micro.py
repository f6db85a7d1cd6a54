"""The CPU cost of a key check and quotas per request, measured in isolation (issue 28): a quiet figure where a shared
machine makes end-to-end latency too noisy to show a few microseconds (bench/tenancy_latency.py).

    python bench/tenancy_micro.py [--requests 20000]

- Python data plane: `TenantWindows.admit` (key parsed, SHA-256, lookup, compare, both scopes' three limits checked
  and counted), the response's `TokenScan` over a typical non-streamed body, and `finish`.
- nginx data plane: the Lua code itself (`check_access`, `scan_total`, `count_tokens`, cut from corral_gateway.lua)
  run by the LuaJIT that nginx uses, with SHA-256 from the same OpenSSL through the FFI; nginx's shared dict and
  `ngx.var` are stood in for by Lua tables (a shared-dict call is a C call of about the same cost: the figure is the
  order of magnitude, not nginx's exact one).
Each figure is CPU time (`time.process_time`: other work on the machine does not count), the fastest of 5 batches.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

from corral.domain.tenancy import KeyEntry, Limits, RouteAccess, new_key
from corral.gateway.tenants import Admission, TenantWindows

LUA = Path(__file__).resolve().parents[1] / "src/corral/gateway/nginx/corral_gateway.lua"
BODY = (b'{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant",'
        b'"content":"hello"},"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}')
HIGH = 10**11


def python_us(requests: int) -> float:
    made = new_key()
    limits = Limits(HIGH, HIGH, HIGH)
    access = RouteAccess("acme", (KeyEntry(made.id, made.digest, None, limits),), limits)
    windows = TenantWindows()
    windows.set_table([access])
    headers = [(b"host", b"gw"), (b"content-type", b"application/json"), (b"authorization", f"Bearer {made.key}".encode())]
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(requests):
            admitted = windows.admit("acme-nlb", access, headers)
            assert isinstance(admitted, Admission)
            admitted.scan.feed(BODY)
            windows.finish(admitted)
        best = min(best, (time.process_time() - started) / requests * 1e6)
    return best


LUA_HARNESS = r"""
local clock = ...
local dict = {}
dict.__index = dict
function dict.new() return setmetatable({ data = {} }, dict) end
function dict:get(k) return self.data[k] end
function dict:set(k, v) self.data[k] = v; return true end
function dict:add(k, v) if self.data[k] ~= nil then return false end self.data[k] = v; return true end
function dict:incr(k, v, init) local n = (self.data[k] or init) + v; self.data[k] = n; return n end
ngx = { shared = { corral_quota = dict.new() }, var = {}, ctx = {}, header = {}, status = 200,
        req = { clear_header = function() end } }
function ngx.now() return clock() end
function ngx.update_time() end
function ngx.say() end
function ngx.exit(s) error("refused: " .. tostring(s)) end
local cjson = { null = false, encode = function() return "" end }
local function reject() end
__CODE__
return function(key, digest, n, body)
  local limits = { requestsPerMinute = 1e11, tokensPerMinute = 1e11, tokensPerDay = 1e11 }
  local access = { auth = "keys", business = "acme", limits = limits,
                   keys = { [digest] = { id = "key-1", limits = limits } } }
  ngx.var.http_authorization = "Bearer " .. key
  for _ = 1, n do
    local ctx = {}
    check_access(ctx, "acme-nlb", access)
    scan_total(ctx, body)
    count_tokens(ctx)
  end
  assert(sha256_hex(key) == digest, "the Lua SHA-256 differs from Python's")
end
"""


def lua_us(requests: int) -> float:
    """The Lua block run by LuaJIT through its C API (ctypes), OpenSSL loaded globally for the FFI's SHA256."""
    ctypes.CDLL("libcrypto.so.3", mode=ctypes.RTLD_GLOBAL)
    lj = ctypes.CDLL("libluajit-5.1.so.2", mode=ctypes.RTLD_GLOBAL)
    lj.luaL_newstate.restype = ctypes.c_void_p
    for name, args in [("luaL_openlibs", [ctypes.c_void_p]), ("luaL_loadstring", [ctypes.c_void_p, ctypes.c_char_p]),
                       ("lua_pcall", [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
                       ("lua_pushstring", [ctypes.c_void_p, ctypes.c_char_p]),
                       ("lua_pushinteger", [ctypes.c_void_p, ctypes.c_ssize_t]),
                       ("lua_tolstring", [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]),
                       ("lua_pushvalue", [ctypes.c_void_p, ctypes.c_int]), ("lua_settop", [ctypes.c_void_p, ctypes.c_int]),
                       ("lua_getfield", [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p])]:
        getattr(lj, name).argtypes = args
    lj.lua_tolstring.restype = ctypes.c_char_p
    text = LUA.read_text()
    start = text.index("-- Keys and quotas (corral/domain/tenancy.py")
    end = text.index("\n-- ", text.index("local function count_tokens"))
    code = text[start:end].replace("local function ", "function ")  # globals, so the harness can call them
    state = lj.luaL_newstate()
    lj.luaL_openlibs(state)

    def run(source: str, *args: bytes | int, results: int = 0) -> None:
        if lj.luaL_loadstring(state, source.encode()) != 0 or _call(args, results) != 0:
            raise RuntimeError(lj.lua_tolstring(state, -1, None).decode())

    def _call(args: tuple, results: int) -> int:
        for arg in args:
            (lj.lua_pushinteger if isinstance(arg, int) else lj.lua_pushstring)(state, arg)
        return lj.lua_pcall(state, len(args), results, 0)

    clock = "return function() return os.clock() end"
    run(clock, results=1)  # the clock function, left on the stack
    harness = LUA_HARNESS.replace("__CODE__", code)
    if lj.luaL_loadstring(state, harness.encode()) != 0:
        raise RuntimeError(lj.lua_tolstring(state, -1, None).decode())
    lj.lua_pushvalue(state, -2)  # the clock as the chunk's argument
    if lj.lua_pcall(state, 1, 1, 0) != 0:
        raise RuntimeError(lj.lua_tolstring(state, -1, None).decode())
    made = new_key()
    best = float("inf")
    for _ in range(5):
        lj.lua_pushvalue(state, -1)
        for arg in (made.key.encode(), made.digest.encode()):
            lj.lua_pushstring(state, arg)
        lj.lua_pushinteger(state, requests)
        lj.lua_pushstring(state, BODY)
        started = time.process_time()
        if lj.lua_pcall(state, 4, 0, 0) != 0:
            raise RuntimeError(lj.lua_tolstring(state, -1, None).decode())
        best = min(best, (time.process_time() - started) / requests * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    print(f"python data plane: key check + quotas + token scan: {python_us(args.requests):.1f} µs per request")
    print(f"nginx data plane (its Lua, LuaJIT + OpenSSL SHA-256): {lua_us(args.requests):.1f} µs per request")


if __name__ == "__main__":
    main()
