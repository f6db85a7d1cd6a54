-- Corral's nginx data plane. The routing table lives in shared memory, pushed by the control plane
-- (POST /routes on the control socket), so an assignment takes effect without an nginx reload.
-- Same behaviour as the Python gateway (corral/gateway/proxy.py): least outstanding requests with
-- random ties, or for a prefix-aware service the scores of corral/domain/replica_picking.py (`pick`), one retry on another replica only when no byte of the request was written to the first
-- (corral/domain/retries.py) and within the service's retry budget, outlier detection (corral/domain/outliers.py:
-- thresholds, growing ejection times, the cap per business), `x-corral-replica`, 400/404/413/503 JSON bodies,
-- per-service/replica counters and in-flight counts, and the same rule for which paths go through (only the
-- OpenAI API: `/s/<service>/v1/...`).
-- The counters are those of corral/gateway/stats.py, in the `corral_stats` shared dict (read by
-- NginxStats): per "<service>|<replica>" `rq:` requests, `er:` errors, `lt:` latency sum, `lb:…|<i>`
-- latency bucket i, `ts:`/`tb:…|<i>` first-byte sum and buckets (streamed responses), `tk:` completion
-- tokens and `tu:` responses with usage, `ip:` in flight; per "<service>|<API key id>" (metering) `mq:` requests,
-- `mp:`/`mc:` prompt/completion tokens, `me:` errors; per replica `if:` in flight, and its outlier
-- record: `ej:` ejected until (present while ejected), `ea:` ejected at, `en:` ejections in a row, `ew:` why,
-- `ot:` readmitted at, `oc:` gateway failures in a row, `cp:` cap refusals (`sp:` suspected, `pf:`/`pp:`
-- failed/passed checks in a row, `cs:` capped this streak: internal); `rj:<service>|<code>` rejections; per
-- service `hq:` requests held now, `hs:` their wait summed and `hb:…|<i>` wait bucket i, `cc:` requests whose
-- client left before the response ended. Bucket bounds come from Python (`configure`), so both planes agree.
-- Read incrementally (`get_stats`): the keys are grouped in units (`p:<service>|<replica>`, `r:<replica>`,
-- `s:<service>`); whoever changes a unit's counters then marks it (`mark`: a `d:` flag, and the unit appended
-- to a change log `c:<seq>` once until it is read), and a read answers only the units logged since the
-- reader's last one, never scanning (and locking) the whole dict but at the first read after a start. The
-- control plane prunes the units of replicas and services that left (`prune`), so the dict stays bounded.
-- Outlier detection: a gateway failure (the balancer's last failure; the last attempt's 502/503/504; a
-- response cut mid-way) counts in `oc:` and marks the replica suspected; `failures` in a row eject it, and
-- so do `probes` failed health checks in a row (worker 0 checks suspected replicas, and ejected ones past
-- their time, every `interval` seconds: `probe_round`); `passes` passed checks bring an ejected one back.
-- One ejection is decided at a time (the `lk:eject` lock), so workers never pass the cap together.
-- The retry budget (domain/retries.py): per service and second, `q:<service>|<second>` requests and
-- `r:<service>|<second>` retries in the `corral_retry` dict, expiring after the window. Two workers may
-- both take the last retry of a window: the budget can be passed by one retry per extra worker.
-- Clients that leave: nginx closes the replica's connection when it notices (proxy_ignore_client_abort
-- off); a held request ends through lua_check_client_abort. A request whose response did not complete
-- (`$request_completion` is empty: nginx terminated it, the client having gone) counts in `cc:`; one whose
-- replica failed mid-response completes (nginx finalizes it normally, cutting the client's connection).
-- A request answered through error_page loses ngx.ctx (an internal redirect): what the log phase needs to
-- give its replica's place back is also kept in `$corral_*` variables.
-- Holding (proxy.py's activator): a request that finds no free replica (none ready or all ejected, or every
-- one at its batch limit: `if:` >= the target's `concurrency`) waits in the access phase, bounded per
-- service by `hq:`, until one frees up or the deadline passes (then 503 with Retry-After). A replica's
-- place is claimed with an atomic `if:` increment when it is chosen, so workers never overfill it. Held
-- requests wait on a semaphore of their worker, posted when that worker gets a new routing table or ends
-- a request of the service; events in another worker (nginx has no cross-worker signal) are caught by
-- re-checking every `recheck` seconds, and so is an ejection expiring.
local balancer = require "ngx.balancer"
local bit = require "bit"
local cjson = require "cjson.safe"
local semaphore = require "ngx.semaphore"

local routes_dict = ngx.shared.corral_routes
local affinity = ngx.shared.corral_affinity  -- prefix key → its last replicas, tab-separated (LRU when full)
local stats = ngx.shared.corral_stats
local retry_dict = ngx.shared.corral_retry
-- The same messages and path rules as corral/gateway/proxy.py (path_error).
local MSG_CONTROL_CHARS = "the request path contains control characters"
local MSG_NOT_API = "only the OpenAI API is served here: /s/<service>/v1/..."
local NOT_API_CHAR = "[^%w%-%._~!%$&'%(%)%*%+,;=:@/]"

local _M = {}
local cached_version, cached_routes = -1, {}
local BUCKETS = { math.huge }  -- upper bounds in seconds, +Inf last: corral.domain.load.BUCKETS via configure()
-- proxy.py's GatewayLimits and wording, via configure()
local HOLD = { timeout = 30, queue = 1000, retry_after = 5, held_suffix = "", full_suffix = "" }
-- service → this worker's held requests in arrival order, each { key = <key id or "">, sema = <its own
-- semaphore>, woken = <posted and not yet run> }: a freed place wakes the one that goes next (`wake_next`)
local held_queues = {}
-- Fair order inside a business (corral/domain/fairness.py, the same rule and costs): service → this worker's
-- virtual token counters { served = { key → weighted tokens }, floor = <the highest counter a request was let go at> }
local fair = {}
local FAIR = { prompt = 1, completion = 2, bytes_per_token = 4 }  -- domain/fairness.py's, via configure()
-- proxy.py's GatewayLimits.retry_budget and wording (`not_retried`: the message after "replica '<name>'", by
-- status), via configure()
local RETRY = { percent = 20, min = 3, window = 10, spent_suffix = "", not_retried = {} }
local NGX_BUSY = -3  -- the balancer's "no peer": nginx answers 502 (error_page: @unavailable), no next try
-- proxy.py's GatewayLimits.outliers and probe interval (domain/outliers.py), via configure()
local OUTLIER = { failures = 5, probes = 3, passes = 2, base = 5, max = 300, percent = 50, decay = 60,
                  interval = 0.5, timeout = 1 }

function _M.configure(buckets, hold, retry, outlier, fairness)
  BUCKETS = buckets
  if fairness then FAIR = fairness end
  if hold then HOLD = hold end
  if retry then RETRY = retry end
  if outlier then OUTLIER = outlier end
end

-- the change log (see the top): after changing a unit's counters, log it once until a read takes it
local function mark(unit)
  if stats:add("d:" .. unit, true) then
    local seq = stats:incr("seq", 1, 0)
    stats:set("c:" .. seq, unit)
  end
end

local function reject(service, status)
  stats:incr("rj:" .. service .. "|" .. status, 1, 0)
  mark("s:" .. service)
end

-- a request of `service` to count in its retry budget (once, at its first attempt)
local function count_request(service)
  retry_dict:incr("q:" .. service .. "|" .. math.floor(ngx.now()), 1, 0, RETRY.window + 1)
end

-- spend one retry of `service`'s budget when the window allows it (RetryBudget.allows)
local function spend_retry(service)
  local now = math.floor(ngx.now())
  local requests, retries = 0, 0
  for second = now - RETRY.window + 1, now do
    requests = requests + (retry_dict:get("q:" .. service .. "|" .. second) or 0)
    retries = retries + (retry_dict:get("r:" .. service .. "|" .. second) or 0)
  end
  if retries >= math.max(RETRY.min, RETRY.percent / 100 * requests) then return false end
  retry_dict:incr("r:" .. service .. "|" .. now, 1, 0, RETRY.window + 1)
  return true
end

-- the bytes written to replicas so far, all attempts (`$upstream_bytes_sent` lists one number per attempt)
local function bytes_written()
  local total = 0
  for n in (ngx.var.upstream_bytes_sent or ""):gmatch("%d+") do total = total + tonumber(n) end
  return total
end

-- the last number of an `$upstream_*` list (one entry per attempt), or nil
local function last_number(list)
  local last
  for n in (list or ""):gmatch("%d+") do last = n end
  return tonumber(last)
end

-- the 0-based index of the first bucket whose bound is >= seconds (Prometheus' `le`), as bucket_index()
local function bucket(seconds)
  local lo, hi = 1, #BUCKETS
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if BUCKETS[mid] >= seconds then hi = mid else lo = mid + 1 end
  end
  return lo - 1
end

-- completion tokens a response reports, read from its chunks as they pass (stats.py's UsageScan): the
-- largest count wins; the last TAIL bytes are kept to find a key split across two chunks
local USAGE_KEY = '"completion_tokens"'
local USAGE_PATTERN = '"completion_tokens"%s*:%s*(%d+)'
local PROMPT_KEY = '"prompt_tokens"'  -- the prompt's count likewise (metering)
local PROMPT_PATTERN = '"prompt_tokens"%s*:%s*(%d+)'
local TAIL = 64

-- the largest count of `key` (default: the completion's) in `text`, and whether the key was there at all
local function most_tokens(text, best, key, pattern)
  if not text:find(key or USAGE_KEY, 1, true) then return best, false end
  for digits in text:gmatch(pattern or USAGE_PATTERN) do
    if #digits <= 12 then
      local n = tonumber(digits)
      if best == nil or n > best then best = n end
    end
  end
  return best, true
end

local function scan_usage(ctx, chunk)
  local tail = ctx.tail or ""
  local joined = tail .. chunk:sub(1, TAIL)
  local best, in_joined = most_tokens(joined, ctx.tokens)
  local found
  ctx.tokens, found = most_tokens(chunk, best)
  if in_joined or found then
    -- a usage object holds both counts, the prompt's a few bytes from the completion's: looked for only there
    local prompt = most_tokens(joined, ctx.prompt, PROMPT_KEY, PROMPT_PATTERN)
    ctx.prompt = most_tokens(chunk, prompt, PROMPT_KEY, PROMPT_PATTERN)
  end
  if #chunk >= TAIL then ctx.tail = chunk:sub(-TAIL) else ctx.tail = (tail .. chunk):sub(-TAIL) end
end

local function routes()
  local version = routes_dict:get("version") or 0
  if version ~= cached_version then
    cached_routes = cjson.decode(routes_dict:get("table") or "{}") or {}
    cached_version = version
    for service in pairs(fair) do
      if not cached_routes[service] then fair[service] = nil end  -- a service gone: its counters go too
    end
  end
  return cached_routes
end

-- OpenAI's error shape, as proxy.py's error_body (SDKs show error.message)
local ERROR_TYPES = { [400] = "invalid_request_error", [401] = "authentication_error", [403] = "permission_error",
                      [404] = "not_found_error", [408] = "invalid_request_error", [413] = "invalid_request_error",
                      [422] = "invalid_request_error", [429] = "rate_limit_error", [503] = "service_unavailable_error",
                      [504] = "timeout_error" }

-- An engine's error answer in OpenAI's shape, its reason kept and no local path: as domain/engine_errors.py.
local ERROR_BODY_MAX = 65536
local QUOTES = { "'", '"', "`" }

local function scrub_paths(message, tag)
  for _, q in ipairs(QUOTES) do
    message = message:gsub(q .. "/[^" .. q .. "\n]*" .. q, function() return q .. tag .. q end)
  end
  return message
end

local function detail_text(detail)
  if type(detail) == "string" then return detail end
  if type(detail) == "table" then
    local parts = {}
    for _, item in ipairs(detail) do
      if type(item) == "table" then
        local where = {}
        if type(item.loc) == "table" then
          for _, x in ipairs(item.loc) do if x ~= "body" then where[#where + 1] = tostring(x) end end
        end
        local msg = item.msg ~= nil and tostring(item.msg) or ""
        parts[#parts + 1] = (#where > 0) and (table.concat(where, ".") .. ": " .. msg) or msg
      else
        parts[#parts + 1] = tostring(item)
      end
    end
    if #parts > 0 or next(detail) == nil then return table.concat(parts, "; ") end
  end
  return cjson.encode(detail) or tostring(detail)
end

local function openai_error(status, body, tag)
  local payload = cjson.decode(body)
  local kind = ERROR_TYPES[status] or (status >= 500 and "server_error" or "invalid_request_error")
  local param, code, message = cjson.null, status, nil
  local inner = type(payload) == "table" and payload.error or nil
  if type(inner) == "table" and type(inner.message) == "string" then  -- OpenAI's (vLLM's, SGLang's) shape
    message = inner.message
    if type(inner.type) == "string" then kind = inner.type end
    if type(inner.param) == "string" then param = inner.param end
    if type(inner.code) == "number" or type(inner.code) == "string" then code = inner.code end
  elseif type(payload) == "table" and payload.detail ~= nil then  -- FastAPI's (transformers serve)
    message = detail_text(payload.detail)
  elseif type(payload) == "table" and type(payload.message) == "string" then  -- vLLM's older shape
    message = payload.message
    if type(payload.param) == "string" then param = payload.param end
  elseif type(payload) == "table" and type(inner) == "string" then
    message = inner
  else
    message = body:match("^%s*(.-)%s*$")
    if message == "" then message = "the engine answered " .. status .. " without a reason" end
  end
  message = scrub_paths(message, tag):sub(1, 2000)
  return cjson.encode({ error = { message = message, type = kind, param = param, code = code } })
end

local function json_exit(status, message, retry_after)
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  if retry_after then ngx.header["Retry-After"] = tostring(retry_after) end
  ngx.say(cjson.encode({ error = { message = message, type = ERROR_TYPES[status] or "server_error", code = status } }))
  return ngx.exit(status)
end

-- Keys and quotas (corral/domain/tenancy.py, corral/gateway/tenants.py: the same rules, messages and bodies) -----
-- A key-protected service's request must present one of its keys (`Authorization: Bearer`, `api-key`,
-- `x-api-key`); it is looked up by its SHA-256 in the verifier table the routing push brought (`route.access.keys`:
-- digest → {id, exp, limits}), never in a database. SHA-256 through LuaJIT's FFI into the OpenSSL nginx is linked
-- with (Debian packages no resty.sha256; see domain/tenancy.py for why a fast hash of a 192-bit key is enough).
-- Quotas: fixed windows in the `corral_quota` shared dict, shared by the workers: `r:<scope>|<minute>` requests,
-- `t:<scope>|<minute>` and `d:<scope>|<day>` tokens (prompt + completion: the largest `total_tokens` a response
-- reports, else one per streamed event), scope `s:<service>` or `k:<key id>`. They survive a reload, not a restart.
local ffi = require "ffi"
ffi.cdef [[unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);]]
local sha_out = ffi.new("unsigned char[32]")
local HEX = {}
for i = 0, 255 do HEX[i] = string.format("%02x", i) end
local hex_parts = {}
local quota = ngx.shared.corral_quota
local last_noted = {}  -- key id → when this worker last wrote its `u:` (at most once a second per key and worker)
local KEY_PREFIX, KEY_MAX_CHARS = "crl-", 128
local MSG_NO_KEY = "this business service needs an API key: send `Authorization: Bearer <key>` (or an `api-key` " ..
                   "header); its owner creates keys with `corral keys create`"
local MSG_BAD_KEY = "invalid API key: unknown, revoked or expired"
local LIMIT_WORDS = { requestsPerMinute = "requests per minute", tokensPerMinute = "tokens per minute",
                      tokensPerDay = "tokens per day (UTC)" }

local function sha256_hex(text)
  ffi.C.SHA256(text, #text, sha_out)
  for i = 0, 31 do hex_parts[i + 1] = HEX[sha_out[i]] end
  return table.concat(hex_parts)
end

local function ours(value)
  if value and value:sub(1, 4) == KEY_PREFIX and #value <= KEY_MAX_CHARS then return value end
end

local function presented_key()
  local auth = ngx.var.http_authorization
  if auth then
    local scheme, token = auth:match("^(%S+) (.*)$")
    if scheme and scheme:lower() == "bearer" then
      local key = ours(token:match("^%s*(%S+)%s*$"))  -- (a key has no space; `.-` would backtrack per character)
      if key then return key end
    end
  end
  return ours(ngx.var.http_api_key) or ours(ngx.var.http_x_api_key)
end

local function access_exit(status, message, code, param, retry_after)
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  if retry_after then ngx.header["Retry-After"] = tostring(retry_after) end
  local kind = status == 401 and "invalid_request_error" or "rate_limit_error"
  ngx.say(cjson.encode({ error = { message = message, type = kind, code = code, param = param or cjson.null } }))
  return ngx.exit(status)
end

local function seconds_left(now, span)
  return math.max(1, math.ceil((math.floor(now / span) + 1) * span - now))
end

-- the first limit of `limits` this scope reached: its kind, limit and Retry-After; or nil
local function over(limits, scope, now)
  local minute, day = math.floor(now / 60), math.floor(now / 86400)
  local rpm, tpm, tpd = limits.requestsPerMinute, limits.tokensPerMinute, limits.tokensPerDay
  if rpm and (quota:get("r:" .. scope .. "|" .. minute) or 0) >= rpm then
    return "requestsPerMinute", rpm, seconds_left(now, 60)
  end
  if tpm and (quota:get("t:" .. scope .. "|" .. minute) or 0) >= tpm then
    return "tokensPerMinute", tpm, seconds_left(now, 60)
  end
  if tpd and (quota:get("d:" .. scope .. "|" .. day) or 0) >= tpd then
    return "tokensPerDay", tpd, seconds_left(now, 86400)
  end
end

local function counts_tokens(limits)
  return limits.tokensPerMinute ~= nil or limits.tokensPerDay ~= nil
end

-- access phase, before anything else is done for the request: 401 without a valid key, 429 over a quota
local function check_access(ctx, service, access)
  local entry
  ngx.update_time()
  local now = ngx.now()
  if access.auth == "keys" then
    local key = presented_key()
    if not key then
      reject(service, 401)
      return access_exit(401, MSG_NO_KEY, "invalid_api_key")
    end
    entry = access.keys[sha256_hex(key)]
    if not entry or (entry.exp and now >= entry.exp) then
      reject(service, 401)
      return access_exit(401, MSG_BAD_KEY, "invalid_api_key")
    end
    if now - (last_noted[entry.id] or 0) >= 1 then  -- when it was last used (read by the control plane), to a second
      last_noted[entry.id] = now
      quota:set("u:" .. entry.id, now, 7 * 86400)
    end
    ctx.key_id, ctx.key_weight = entry.id, math.max(1, entry.weight or 1)
    -- a tenant's key stops here: the replica needs none, and must never see (or log) one
    ngx.req.clear_header("Authorization")
    ngx.req.clear_header("api-key")
    ngx.req.clear_header("x-api-key")
  end
  local scopes = { { "s:" .. service, access.limits, "business service '" .. service .. "'" } }
  if entry and entry.limits then scopes[2] = { "k:" .. entry.id, entry.limits, "key '" .. entry.id .. "'" } end
  for _, s in ipairs(scopes) do
    if s[2] then
      local kind, limit, retry_after = over(s[2], s[1], now)
      if kind then
        reject(service, 429)
        return access_exit(429, "rate limit exceeded: " .. s[3] .. " allows " .. limit .. " " .. LIMIT_WORDS[kind] ..
                           " (" .. kind .. "); retry after " .. retry_after .. " s", "rate_limit_exceeded", kind, retry_after)
      end
    end
  end
  local minute = math.floor(now / 60)
  for _, s in ipairs(scopes) do
    if s[2] then
      quota:incr("r:" .. s[1] .. "|" .. minute, 1, 0, 120)
      if counts_tokens(s[2]) then
        ctx.quota_scopes = ctx.quota_scopes or {}
        ctx.quota_scopes[#ctx.quota_scopes + 1] = s[1]
      end
    end
  end
  ctx.business = access.business  -- with ctx.key_id: who the request is for (a meter counts per key from here)
end

-- a response's tokens for the quotas (domain/tenancy.py's TokenScan): the largest `total_tokens`, or the events
local TOTAL_PATTERN = '"total_tokens"%s*:%s*(%d+)'
local function scan_total(ctx, chunk, events)
  local text = (ctx.qtail or "") .. chunk
  if text:find('"total_tokens"', 1, true) then
    for digits in text:gmatch(TOTAL_PATTERN) do
      if #digits <= 12 then
        local n = tonumber(digits)
        if not ctx.qtotal or n > ctx.qtotal then ctx.qtotal = n end
      end
    end
  end
  ctx.qevents = (ctx.qevents or 0) + events
  ctx.qtail = text:sub(-64)
end

-- the request ended: its tokens count in its scopes' windows
local function count_tokens(ctx)
  local scopes = ctx.quota_scopes
  if not scopes then return end
  ctx.quota_scopes = nil
  local tokens = ctx.qtotal or ctx.qevents or 0
  if tokens <= 0 then return end
  ngx.update_time()
  local now = ngx.now()
  local minute, day = math.floor(now / 60), math.floor(now / 86400)
  for _, scope in ipairs(scopes) do
    quota:incr("t:" .. scope .. "|" .. minute, tokens, 0, 120)
    quota:incr("d:" .. scope .. "|" .. day, tokens, 0, 2 * 86400)
  end
end

-- Replica picking (corral/domain/replica_picking.py, the same steps and numbers): filter, score, pick ---------
local BLOCK_BYTES, MAX_BLOCKS, MAX_ROUTING_BODY, OWNERS = 256, 64, 1024 * 1024, 3
local inputs_seq, replica_inputs = -1, {}  -- the engines' figures per replica, pushed by the control plane

-- replica → { waiting = n, kv = usage, adapters = { name = true } } (POST /inputs; decoded once per push)
local function inputs()
  local seq = routes_dict:get("inputs_seq") or 0
  if seq ~= inputs_seq then
    local decoded = cjson.decode(routes_dict:get("inputs") or "{}") or {}
    for name, i in pairs(decoded) do
      if type(i) ~= "table" then i = {} decoded[name] = i end
      local set = {}
      for _, name in ipairs(type(i.adapters) == "table" and i.adapters or {}) do set[name] = true end
      i.adapters = set
      if type(i.waiting) ~= "number" then i.waiting = 0 end
      if type(i.kv) ~= "number" then i.kv = 0 end
    end
    replica_inputs, inputs_seq = decoded, seq
  end
  return replica_inputs
end

local function content_text(content)
  if type(content) == "string" then return content end
  if type(content) ~= "table" then return "" end
  local parts = {}
  for _, part in ipairs(content) do
    if type(part) == "table" and type(part.text) == "string" then parts[#parts + 1] = part.text end
  end
  return table.concat(parts)
end

-- the prompt's leading text: each chat message as "role\ncontent\n", or a completion's prompt (prompt_bytes)
local function prompt_bytes(payload)
  local limit = BLOCK_BYTES * MAX_BLOCKS
  local messages = payload.messages
  if type(messages) == "table" then
    local out, size = {}, 0
    for _, message in ipairs(messages) do
      if size >= limit then break end
      if type(message) == "table" then
        local text = (type(message.role) == "string" and message.role or "") .. "\n"
            .. content_text(message.content) .. "\n"
        out[#out + 1], size = text, size + #text
      end
    end
    return table.concat(out):sub(1, limit)
  end
  if type(payload.prompt) == "string" then return payload.prompt:sub(1, limit) end
  return ""
end

-- what picking reads of the request (read_request): its `model` and its prompt's prefix keys; the body is
-- read only for a prefix-aware service or one with replicas that report LoRA adapters
local function pick_request(route)
  local needed = route.picking ~= nil
  if not needed then
    local known = inputs()
    if next(known) == nil then return nil end  -- no replica reports adapters: nothing to read (the common case)
    for _, target in ipairs(route.targets) do
      local i = known[target.name]
      if i and next(i.adapters) then needed = true break end
    end
  end
  if not needed then return nil end
  ngx.req.read_body()
  local body = ngx.req.get_body_data()  -- nil when spooled to a file (over 1 MiB): least load
  if not body or #body > MAX_ROUTING_BODY then return nil end
  local payload = cjson.decode(body)
  if type(payload) ~= "table" then return nil end
  local text, keys = prompt_bytes(payload), {}
  for k = 1, math.min(math.floor(#text / BLOCK_BYTES), MAX_BLOCKS) do
    keys[k] = ngx.crc32_long(text:sub(1, k * BLOCK_BYTES))
  end
  return { model = type(payload.model) == "string" and payload.model or nil, keys = keys }
end

-- the replicas that report `model` loaded as a LoRA adapter; nil when none does (no filter)
local function adapter_holders(route, model)
  if not model then return nil end
  local known, holders = inputs(), nil
  for _, target in ipairs(route.targets) do
    local i = known[target.name]
    if i and i.adapters[model] then
      holders = holders or {}
      holders[target.name] = true
    end
  end
  return holders
end

-- prefix-aware: the weighted scores (scores() in Python, the same expression), ties by rendezvous hashing
local function pick_scored(route, candidates, loads, keys)
  local weights, known = route.picking, inputs()
  local names, depth = {}, {}
  for _, target in ipairs(candidates) do names[target.name] = true end
  local owners = {}  -- key index → its owners, as stored
  for k = #keys, 1, -1 do
    owners[k] = affinity:get(tostring(keys[k]))
    for owner in (owners[k] or ""):gmatch("[^\t]+") do
      if names[owner] and not depth[owner] then depth[owner] = k end
    end
  end
  local queue, scale = {}, 0
  for _, target in ipairs(candidates) do
    local i = known[target.name]
    local q = loads[target.name] + (i and i.waiting or 0)
    queue[target.name] = q
    if q > scale then scale = q end
  end
  scale = scale + 1.0
  local best, tied = nil, {}
  for _, target in ipairs(candidates) do
    local i = known[target.name]
    local prefix = #keys > 0 and (depth[target.name] or 0) / #keys or 0.0
    local kv = 1.0 - (i and i.kv or 0.0)
    local score = weights.prefix * prefix + weights.queue * (1.0 - queue[target.name] / scale) + weights.kv * kv
    if best == nil or score > best then
      best, tied = score, { target }
    elseif score == best then
      tied[#tied + 1] = target
    end
  end
  local chosen = tied[1]
  if #tied > 1 then
    if #keys == 0 then
      chosen = tied[math.random(#tied)]
    else
      local top
      for _, target in ipairs(tied) do
        local h = ngx.crc32_long(tostring(keys[1]) .. ":" .. target.name)
        if top == nil or h > top or (h == top and target.name > chosen.name) then chosen, top = target, h end
      end
    end
  end
  for k, key in ipairs(keys) do
    local kept = { chosen.name }
    for owner in (owners[k] or ""):gmatch("[^\t]+") do
      if owner ~= chosen.name and #kept < OWNERS then kept[#kept + 1] = owner end
    end
    affinity:set(tostring(key), table.concat(kept, "\t"))
  end
  return chosen
end

-- `rewrite`: nil, or only targets whose `rewrite` flag is the same (a retry keeps the request's rewrite);
-- `want`: the request's pick_request (nil: least load, no adapter filter)
-- may `target` take a request now: in rotation and below its batch limit? (and its requests in flight)
local function has_room(target)
  local in_flight = stats:get("if:" .. target.name) or 0
  return not stats:get("ej:" .. target.name) and (target.concurrency == nil or in_flight < target.concurrency),
         in_flight
end

local function pick(route, tried, rewrite, want)
  local holders = want and adapter_holders(route, want.model)
  local candidates, loads, fewest = {}, {}, nil
  for _, target in ipairs(route.targets) do
    local room, in_flight = has_room(target)
    if room and not tried[target.name]
        and (rewrite == nil or (target.rewrite == true) == rewrite)
        and (holders == nil or holders[target.name]) then
      candidates[#candidates + 1], loads[target.name] = target, in_flight
      if fewest == nil or in_flight < fewest then fewest = in_flight end
    end
  end
  if #candidates == 0 then return nil end
  if route.picking and want then return pick_scored(route, candidates, loads, want.keys) end
  local best = {}
  for _, target in ipairs(candidates) do
    if loads[target.name] == fewest then best[#best + 1] = target end
  end
  return best[math.random(#best)]
end

-- pick, and count the request in flight on the replica at once (`ctx.claimed`): the increment is atomic
-- across workers, so one that finds the replica full after all gives the place back and picks again
local function claim(ctx, route, tried, rewrite)
  local full = setmetatable({}, { __index = tried })
  while true do
    local target = pick(route, full, rewrite, ctx.want)
    if not target then return nil end
    local in_flight = stats:incr("if:" .. target.name, 1, 0)
    if target.concurrency == nil or in_flight <= target.concurrency then
      ctx.claimed = target.name
      ngx.var.corral_claim = target.name
      mark("r:" .. target.name)
      return target
    end
    stats:incr("if:" .. target.name, -1, 0)
    full[target.name] = true
  end
end

-- fair order (corral/domain/fairness.py) -------------------------------------------------------------------------
local function counters(service)
  local f = fair[service]
  if not f then
    f = { served = {}, floor = 0 }
    fair[service] = f
  end
  return f
end

-- a request of `key` joins `queue` (the requests held before it): a key with none there is lifted to the
-- smallest counter among them (none held: the floor), so time it sent nothing earns it nothing
local function fair_join(service, key, queue)
  local f = counters(service)
  local lift
  for _, waiter in ipairs(queue) do
    if waiter.key == key then return end
    local c = f.served[waiter.key] or 0
    if lift == nil or c < lift then lift = c end
  end
  if lift == nil then lift = f.floor end
  if (f.served[key] or 0) < lift then f.served[key] = lift end
end

-- the replicas of `route` free now (in rotation, below their batch limit), by name; nil when none is
local function free_places(route)
  local free
  for _, target in ipairs(route.targets) do
    if has_room(target) then
      free = free or {}
      free[target.name] = true
    end
  end
  return free
end

-- can a held request with `want` (its adapter) take one of the `free` places?
local function can_take(route, want, free)
  local holders = want and adapter_holders(route, want.model)
  if not holders then return true end
  for name in pairs(holders) do
    if free[name] then return true end
  end
  return false
end

-- a place of `service` is free: wake the held request that goes next among those not woken (the first of the
-- key with the smallest counter), passing over one whose adapter no free replica holds (woken, it would find
-- nothing, and the place would idle while the others wait)
local function wake_next(service)
  local queue = held_queues[service]
  if not queue then return end
  local served = fair[service] and fair[service].served or {}
  local route = routes()[service]
  local free = route and queue.adapters and free_places(route)
  local best, least
  for _, waiter in ipairs(queue) do
    if not waiter.woken and (not free or can_take(route, waiter.want, free)) then
      local c = served[waiter.key] or 0
      if best == nil or c < least then best, least = waiter, c end
    end
  end
  if best then
    best.woken = true
    best.sema:post(1)
  end
end

-- the request goes to a replica: charge its prompt's estimate now (settled in the log phase)
local function fair_dispatch(ctx)
  local f = counters(ctx.service)
  local key, weight = ctx.key_id or "", ctx.key_weight or 1
  local estimate = math.max(1, math.floor((tonumber(ngx.var.content_length) or 0) / FAIR.bytes_per_token))
  local before = f.served[key] or 0
  if before > f.floor then f.floor = before end
  f.served[key] = before + FAIR.prompt * estimate / weight
  ctx.fair = { key = key, weight = weight, estimate = estimate }
end

local function fair_settle(ctx, prompt, completion)
  local charge = ctx.fair
  if not charge then return end
  ctx.fair = nil
  local f = fair[ctx.service]
  if not f then return end
  local cost = 0
  if prompt then cost = cost + FAIR.prompt * (prompt - charge.estimate) end
  if completion then cost = cost + FAIR.completion * completion end
  if cost ~= 0 then f.served[charge.key] = (f.served[charge.key] or 0) + cost / charge.weight end
end

-- the request gave its replica's place back: wake the request of the service this worker holds that goes next
local function release(ctx)
  local name = ctx.claimed
  if not name then return end
  ctx.claimed = nil
  ngx.var.corral_claim = ""
  stats:incr("if:" .. name, -1, 0)
  mark("r:" .. name)
  if held_queues[ctx.service] then wake_next(ctx.service) end
end

local function wake_all()
  for _, queue in pairs(held_queues) do
    for _, waiter in ipairs(queue) do
      if not waiter.woken then
        waiter.woken = true
        waiter.sema:post(1)
      end
    end
  end
end

-- why a request waits: every replica at its batch limit, or none in rotation
local function waiting_reason(route)
  for _, target in ipairs(route.targets) do
    if not stats:get("ej:" .. target.name) then return route.busy end
  end
  return route.message
end

local function unhold(ctx)
  if not ctx.held_since then return end
  local me, queue = ctx.held_entry, held_queues[ctx.service]
  ctx.held_entry = nil
  if me and queue then
    for i, waiter in ipairs(queue) do
      if waiter == me then
        table.remove(queue, i)
        break
      end
    end
    if #queue == 0 then held_queues[ctx.service] = nil end
    if me.woken then wake_next(ctx.service) end  -- woken for a place it did not take (it left): the next one's
  end
  ngx.update_time()
  local seconds = ngx.now() - ctx.held_since
  ctx.held_since = nil
  stats:incr("hq:" .. ctx.service, -1, 0)
  stats:incr("hs:" .. ctx.service, seconds, 0)
  stats:incr("hb:" .. ctx.service .. "|" .. bucket(seconds), 1, 0)
  mark("s:" .. ctx.service)
end

-- hold the request until a replica of its service is free: that route and replica (claimed), or the
-- request is answered here (503 past the deadline or with the queue full; 404 when its service is gone)
local function hold(ctx, service, route)
  local held = HOLD.timeout > 0 and HOLD.queue > 0 and stats:incr("hq:" .. service, 1, 0)
  if not held or held > HOLD.queue then
    if held then stats:incr("hq:" .. service, -1, 0) end
    reject(service, 503)
    return json_exit(503, waiting_reason(route) .. (held and HOLD.full_suffix or ""), HOLD.retry_after)
  end
  mark("s:" .. service)
  ngx.update_time()
  ctx.held_since = ngx.now()
  local deadline = ctx.held_since + HOLD.timeout
  local queue = held_queues[service]
  if not queue then
    queue = {}
    held_queues[service] = queue
  end
  local me = { key = ctx.key_id or "", sema = semaphore.new(0), woken = false, want = ctx.want }
  if ctx.want and ctx.want.model then
    queue.adapters = true  -- (wake_next then checks who can take a free place: adapters move while it waits)
  end
  fair_join(service, me.key, queue)
  queue[#queue + 1] = me
  ctx.held_entry = me
  if #queue > 1 and pick(route, {}) then wake_next(service) end  -- queued behind others with a place free
  local recheck = ngx.worker.count() > 1 and 0.05 or 1
  while true do
    ngx.update_time()
    local left = deadline - ngx.now()
    if left <= 0 then break end
    local posted = me.sema:wait(math.min(left, recheck))
    me.woken = false
    local current = routes()[service]
    if not current then
      unhold(ctx)
      reject("", 404)
      return json_exit(404, "service '" .. service .. "' not found")
    end
    route = current
    if posted then
      local target = claim(ctx, route, {})
      if target then
        unhold(ctx)
        return route, target
      end
    elseif pick(route, {}) then
      -- the recheck found a place (freed in another worker, an ejection over): the fair order says who takes
      -- it (perhaps this request: its semaphore is posted and the next wait returns at once), not the first timer
      wake_next(service)
    end
  end
  unhold(ctx)
  reject(service, 503)
  return json_exit(503, waiting_reason(route) .. HOLD.held_suffix, HOLD.retry_after)
end

-- outlier detection (corral/domain/outliers.py, the same rules and numbers) ---------------------------------
local function forgiven(name, now)  -- ejections in a row, less one per `decay` seconds back in rotation
  local n = stats:get("en:" .. name) or 0
  local back = stats:get("ot:" .. name)
  if back and OUTLIER.decay > 0 then n = math.max(0, n - math.floor(math.max(0, now - back) / OUTLIER.decay)) end
  return n
end

local function ejection_seconds(n)
  return math.min(OUTLIER.base * math.max(n, 1), math.max(OUTLIER.max, OUTLIER.base))
end

-- whether ejecting `name` keeps every service that routes to it within the cap (outliers.may_eject)
local function may_eject(name)
  for _, route in pairs(routes()) do
    local member, out = false, 0
    for _, target in ipairs(route.targets) do
      if target.name == name then
        member = true
      elseif stats:get("ej:" .. target.name) then
        out = out + 1
      end
    end
    if member and out + 1 > math.floor(OUTLIER.percent * #route.targets / 100 + 1e-9) then return false end
  end
  return true
end

-- take `name` out of rotation unless the cap forbids it (counted in `cp:` once a streak); whether it is out
local function eject(name, reason)
  if stats:get("ej:" .. name) then return true end
  if not stats:add("lk:eject", true, 1) then return false end  -- another worker decides one: the next failure retries
  local out = may_eject(name)
  if out then
    ngx.update_time()
    local now = ngx.now()
    local n = forgiven(name, now) + 1
    stats:set("en:" .. name, n)
    stats:set("ea:" .. name, now)
    stats:set("ew:" .. name, reason)
    stats:set("oc:" .. name, 0)
    for _, kind in ipairs({ "sp:", "pf:", "pp:", "cs:" }) do stats:delete(kind .. name) end
    stats:set("ej:" .. name, now + ejection_seconds(n))
    ngx.log(ngx.WARN, "ejecting replica ", name, " (", reason, "): out for ", ejection_seconds(n), " s")
  elseif stats:add("cs:" .. name, true) then
    stats:incr("cp:" .. name, 1, 0)
  end
  stats:delete("lk:eject")
  mark("r:" .. name)
  return out
end

-- a gateway failure of `name` (connection refused, reset or timed out; a 502/503/504 answer; cut mid-response)
local function gateway_failure(name)
  local n = stats:incr("oc:" .. name, 1, 0)
  local ejected = stats:get("ej:" .. name)
  if not ejected then stats:set("sp:" .. name, true) end
  mark("r:" .. name)
  if not ejected and OUTLIER.failures > 0 and n >= OUTLIER.failures then eject(name, "failures") end
end

local function succeeded(name)
  if (stats:get("oc:" .. name) or 0) > 0 then
    stats:set("oc:" .. name, 0)
    stats:delete("cs:" .. name)
    mark("r:" .. name)
  end
end

-- log phase: the last attempt's outcome, unless the balancer counted it (its failure led to a retry decision)
local function judge_last_attempt(ctx)
  local replica = ngx.var.corral_replica
  local attempts = tonumber(ngx.var.corral_attempts) or 0
  if not replica or replica == "" or attempts == 0 or tonumber(ngx.var.corral_judged) == attempts then return end
  local status = last_number(ngx.var.upstream_status)
  if status == 502 or status == 503 or status == 504 then
    gateway_failure(replica)
  elseif not status or ngx.var.request_completion ~= "OK" then
    return  -- no answer to judge, or its client left before the end (proxy.py counts neither)
  elseif ctx.target and not ctx.eof then
    gateway_failure(replica)  -- cut mid-response: nginx ended the request without the response's end
  else
    succeeded(replica)
  end
end

-- one health check: whether `target` answers 200 on its engine's health path within the timeout
local function check(target)
  local sock = ngx.socket.tcp()
  sock:settimeout(OUTLIER.timeout * 1000)
  local ok = sock:connect(target.host, target.port)
  if not ok then return false end
  local sent = sock:send("GET " .. (target.health or "/health") .. " HTTP/1.0\r\nHost: " .. target.host
    .. "\r\nUser-Agent: corral-gateway\r\n\r\n")
  local line = sent and sock:receive("*l")
  sock:close()
  return line ~= nil and line:match("^HTTP/%d%.%d 200") ~= nil
end

-- a check's result (outliers.probed): an ejected replica past its time comes back after `passes` passes in a
-- row; a suspected one is cleared by a pass and ejected after `probes` failures in a row
local function probed(name, passed)
  ngx.update_time()
  local now = ngx.now()
  local until_ = stats:get("ej:" .. name)
  if until_ then
    if now < until_ then return end
    if not passed then
      stats:set("pp:" .. name, 0)
      return
    end
    if stats:incr("pp:" .. name, 1, 0) < OUTLIER.passes then return end
    for _, kind in ipairs({ "ej:", "ea:", "ew:", "pp:" }) do stats:delete(kind .. name) end
    stats:set("ot:" .. name, now)
    stats:set("oc:" .. name, 0)
    mark("r:" .. name)
    ngx.log(ngx.WARN, "replica ", name, " is healthy again; back in rotation")
    wake_all()
  elseif stats:get("sp:" .. name) then
    if passed then
      stats:delete("sp:" .. name)
      stats:delete("pf:" .. name)
    elseif stats:incr("pf:" .. name, 1, 0) >= OUTLIER.probes then
      eject(name, "probes")
    end
  end
end

local probing = false

-- worker 0, every `interval` seconds: check the suspected replicas and the ejected ones past their time
local function check_due()
  ngx.update_time()
  local now = ngx.now()
  local seen, due = {}, {}
  for _, route in pairs(routes()) do
    for _, target in ipairs(route.targets) do
      if not seen[target.name] then
        seen[target.name] = true
        local until_ = stats:get("ej:" .. target.name)
        if (until_ and now >= until_) or (not until_ and stats:get("sp:" .. target.name)) then
          due[#due + 1] = target
        end
      end
    end
  end
  local threads = {}
  for i, target in ipairs(due) do threads[i] = ngx.thread.spawn(check, target) end
  for i, target in ipairs(due) do
    local ok, passed = ngx.thread.wait(threads[i])
    probed(target.name, ok and passed)
  end
end

local function probe_round(premature)
  if premature or probing then return end
  probing = true
  local ok, err = pcall(check_due)
  probing = false
  if not ok then ngx.log(ngx.ERR, "outlier checks failed: ", err) end
end

function _M.init_worker()
  if ngx.worker.id() == 0 then
    local ok, err = ngx.timer.every(OUTLIER.interval, probe_round)
    if not ok then ngx.log(ngx.ERR, "cannot start the outlier checks: ", err) end
  end
end

-- `/v1/` then non-empty segments of plain URL characters: no `%` left, no `.`/`..` segment
local function api_path(rest)
  if rest:sub(1, 4) ~= "/v1/" or rest:find(NOT_API_CHAR) or rest:find("//", 1, true) or rest:sub(-1) == "/" then
    return false
  end
  return not (rest .. "/"):find("/%.%.?/")
end

-- The path as the client sent it, decoded once, not normalised by nginx ($uri resolves dot segments
-- and merges slashes): the rules apply to what the client asked for, as on the Python data plane.
local function client_path()
  -- (unescape_uri decodes `+` as a space, as in a form; in a path it is a plus)
  return ngx.unescape_uri((ngx.var.request_uri:match("^[^?]*"):gsub("%+", "%%2B")))
end

local function refuse_path(path)
  if path:find("%c") or ngx.var.uri:find("%c") then
    return json_exit(400, MSG_CONTROL_CHARS)
  end
  return json_exit(404, "no route for '" .. path .. "'; business services live under /s/<service>/v1/...")
end

-- the service, its route and the path the replica gets; or the request is answered here
local function checked(path)
  local service, rest = path:match("^/s/([^/]+)(.*)$")
  if not service or path:find("%c") or ngx.var.uri:find("%c") then
    return refuse_path(path)
  end
  local route = routes()[service]
  if not api_path(rest) then
    reject(route and service or "", 404)
    return json_exit(404, MSG_NOT_API)
  end
  return service, rest, route
end

-- content of every path outside /s/ (after nginx resolved dot segments: `/s/x/../../health` lands here)
function _M.no_route()
  local path = client_path()
  if path:sub(1, 3) == "/s/" then checked(path) end
  return refuse_path(path)
end

-- access phase: which service, is there a replica, and the URI the replica gets
-- A fresh nginx serves no table until the control plane's first push, milliseconds after it listens: a request
-- that comes first waits for that table (at most the hold timeout) rather than hear that an existing service
-- does not exist. Version 0 means no push yet (the control plane's versions start at 1).
local function after_first_table(path)
  ngx.update_time()
  local deadline = ngx.now() + math.max(HOLD.timeout, 1)
  while (routes_dict:get("version") or 0) == 0 and ngx.now() < deadline do
    ngx.sleep(0.01)
    ngx.update_time()
  end
  return checked(path)
end

function _M.route()
  local service, rest, route = checked(client_path())
  if not route and (routes_dict:get("version") or 0) == 0 then
    service, rest, route = after_first_table(client_path())
  end
  if not route then
    reject("", 404)  -- the name is the client's: one counter per name would grow without bound
    return json_exit(404, "service '" .. service .. "' not found")
  end
  if route.access then check_access(ngx.ctx, service, route.access) end  -- keys and quotas: 401 / 429 here
  if route.models and rest == "/v1/models" and ngx.req.get_method() == "GET" then
    ngx.header["content-type"] = "application/json"
    ngx.say(cjson.encode(route.models))
    return ngx.exit(200)
  end
  local ctx = ngx.ctx
  ctx.service = service
  ngx.var.corral_service = service
  ctx.want = pick_request(route)  -- the request's model and prompt prefix, for replica picking
  -- behind requests this worker holds a new one queues too (while the queue has room): the fair order decides
  local queue = held_queues[service]
  local behind = queue ~= nil and HOLD.timeout > 0 and (stats:get("hq:" .. service) or 0) < HOLD.queue
  local target = not behind and claim(ctx, route, {}) or nil
  if not target then
    route, target = hold(ctx, service, route)  -- (a client that leaves meanwhile ends the request there)
  end
  fair_dispatch(ctx)
  ctx.route, ctx.target, ctx.tried = route, target, {}
  if target.rewrite then
    -- the engine does not answer to the tag (see routing.py): `"model": "<tag>"` → `"model": null`. A body
    -- spooled to a file (over client_body_buffer_size, 1 MiB) is sent as is.
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body then
      local tag = route.model:gsub("%p", "%%%0")
      local mapped, count = body:gsub('"model"%s*:%s*"' .. tag .. '"', '"model":null', 1)
      if count > 0 then
        ngx.req.set_body_data(mapped)
        ctx.rewrite = true
      end
    end
  end
  ngx.req.set_uri(rest)
end

local RESPONSE_MODEL = '"model"%s*:%s*"[^"]*"'
local MAX_BUFFERED = 32 * 1024 * 1024

-- body filter: counts a stream's first byte and the usage a response reports; then the answer's `model`
-- back to the tag (each server-sent event, or a JSON body whole)
function _M.body()
  local ctx = ngx.ctx
  if ngx.arg[2] then ctx.eof = true end  -- the response's end came (not cut mid-way)
  if ctx.engine_error then  -- buffered whole (bounded), answered in OpenAI's shape at its end
    local pending = (ctx.pending_error or "") .. (ngx.arg[1] or "")
    if #pending > ERROR_BODY_MAX then
      ngx.arg[1], ctx.pending_error, ctx.engine_error = pending, nil, false
      return
    end
    if ngx.arg[2] then
      ctx.pending_error = nil
      ngx.arg[1] = openai_error(ngx.status, pending, ctx.route and ctx.route.model or "")
    else
      ngx.arg[1], ctx.pending_error = "", pending
    end
    return
  end
  if ctx.scan then
    local chunk = ngx.arg[1]
    if chunk and chunk ~= "" then
      -- the chunk's server-sent events, counted once for both readers: a response's tokens when it reports no
      -- usage (a quota's, scan_total; the fair order's, for a stream: proxy.py counts alike)
      local events = 0
      if ctx.events or ctx.quota_scopes then
        for _ in chunk:gmatch("data: {") do events = events + 1 end
      end
      if ctx.events then
        if not ctx.ttfb then
          ngx.update_time()
          ctx.ttfb = ngx.now() - ctx.started
        end
        ctx.events_seen = (ctx.events_seen or 0) + events
      end
      scan_usage(ctx, chunk)
      if ctx.quota_scopes then scan_total(ctx, chunk, events) end
    end
  end
  if not ctx.rewrite then return end
  local model = '"model":' .. cjson.encode(ctx.route.model)
  local replace = function() return model end
  local pending = (ctx.pending or "") .. (ngx.arg[1] or "")
  if ngx.arg[2] then
    ctx.pending = nil
    ngx.arg[1] = pending:gsub(RESPONSE_MODEL, replace, (not ctx.events) and 1 or nil)
    return
  end
  if ctx.events then
    local cut = pending:match(".*\n()")
    if cut then
      ngx.arg[1] = pending:sub(1, cut - 1):gsub(RESPONSE_MODEL, replace)
      ctx.pending = pending:sub(cut)
    else
      ngx.arg[1], ctx.pending = "", pending
    end
  elseif #pending > MAX_BUFFERED then
    ngx.arg[1], ctx.pending, ctx.rewrite = pending, nil, false
  else
    ngx.arg[1], ctx.pending = "", pending
  end
end

-- one attempt ended: its counters (its replica's place is given back by release)
local function finish(ctx, failed)
  local name = ctx.counted
  if not name then return end
  ctx.counted = nil
  ngx.update_time()
  local key = ctx.service .. "|" .. name
  local seconds = ngx.now() - ctx.started
  stats:incr("ip:" .. key, -1, 0)
  stats:incr("rq:" .. key, 1, 0)
  if failed then stats:incr("er:" .. key, 1, 0) end
  stats:incr("lt:" .. key, seconds, 0)
  stats:incr("lb:" .. key .. "|" .. bucket(seconds), 1, 0)
  -- metering (stats.py's `metered`): per service and API key ("" without one), never per replica
  local meter = ctx.service .. "|" .. (ctx.key_id or "")
  stats:incr("mq:" .. meter, 1, 0)
  if failed then stats:incr("me:" .. meter, 1, 0) end
  if ctx.tokens then stats:incr("mc:" .. meter, ctx.tokens, 0) end
  if ctx.prompt then stats:incr("mp:" .. meter, ctx.prompt, 0) end
  mark("m:" .. meter)
  if ctx.ttfb then
    stats:incr("ts:" .. key, ctx.ttfb, 0)
    stats:incr("tb:" .. key .. "|" .. bucket(ctx.ttfb), 1, 0)
    ctx.ttfb = nil
  end
  if ctx.tokens then
    stats:incr("tk:" .. key, ctx.tokens, 0)
    stats:incr("tu:" .. key, 1, 0)
    ctx.tokens = nil
  end
  ctx.prompt = nil
  mark("p:" .. key)
end

-- balancer phase: runs once per attempt; a second run is the retry after a failure. nginx itself passes no
-- POST on once it was sent (no `non_idempotent` in proxy_next_upstream); for any other method the
-- balancer refuses a retry after a byte of the request was written: the replica may have run it.
function _M.balance()
  local ctx = ngx.ctx
  local failed, status = balancer.get_last_failure()
  if failed then
    ngx.var.corral_judged = ngx.var.corral_attempts  -- this attempt's failure is counted here, not in the log phase
    gateway_failure(ctx.target.name)
    finish(ctx, true)
    ngx.var.corral_started = ""
    release(ctx)
    if bytes_written() > 0 then
      ngx.var.corral_refusal = tostring(status == 504 and 504 or 502)
      return ngx.exit(NGX_BUSY)
    end
    local next_target = claim(ctx, ctx.route, ctx.tried, ctx.target.rewrite == true)
    if not next_target then return ngx.exit(NGX_BUSY) end
    if not spend_retry(ctx.service) then
      release(ctx)
      ngx.var.corral_refusal = "budget"
      return ngx.exit(NGX_BUSY)
    end
    ctx.target = next_target
  else
    count_request(ctx.service)
    balancer.set_more_tries(1)
  end
  ctx.tried[ctx.target.name] = true
  ngx.update_time()
  ctx.counted, ctx.started = ctx.target.name, ngx.now()
  ngx.var.corral_replica, ngx.var.corral_started = ctx.target.name, ctx.started
  ngx.var.corral_attempts = (tonumber(ngx.var.corral_attempts) or 0) + 1
  stats:incr("ip:" .. ctx.service .. "|" .. ctx.target.name, 1, 0)
  mark("p:" .. ctx.service .. "|" .. ctx.target.name)
  local ok, err = balancer.set_current_peer(ctx.target.host, ctx.target.port)
  if not ok then ngx.log(ngx.ERR, "set_current_peer: ", err) end
end

function _M.header()
  local ctx = ngx.ctx
  local target = ctx.target
  if not target then return end
  ngx.header["x-corral-replica"] = target.name
  local content_type = ngx.header["content-type"]
  if type(content_type) ~= "string" then content_type = "" end
  ctx.events = content_type:find("text/event-stream", 1, true) ~= nil
  ctx.scan = ctx.events or content_type:find("application/json", 1, true) ~= nil
  if ngx.status >= 400 and not ctx.events then
    ctx.engine_error, ctx.scan = true, false
    ngx.header["content-length"] = nil
    ngx.header["content-type"] = "application/json"
  end
  if ctx.rewrite then ngx.header["content-length"] = nil end
end

function _M.log()
  local ctx = ngx.ctx
  local prompt, completion = ctx.prompt, ctx.tokens or ctx.events_seen  -- (finish clears them)
  if not ctx.service then
    -- answered through error_page (@unavailable, @too_large): the internal redirect dropped ngx.ctx
    local service = ngx.var.corral_service
    if not service or service == "" then return end  -- never routed
    ctx.service = service
    local claimed = ngx.var.corral_claim
    if claimed and claimed ~= "" then ctx.claimed = claimed end
    local started = tonumber(ngx.var.corral_started)
    if started then ctx.counted, ctx.started = ngx.var.corral_replica, started end
  end
  if ctx.counted then finish(ctx, ngx.status >= 500) end
  count_tokens(ctx)
  fair_settle(ctx, prompt, completion)
  judge_last_attempt(ctx)
  release(ctx)  -- also a place claimed by a request that never reached its replica (e.g. a body too large)
  unhold(ctx)  -- a request cut while held
  if ngx.var.request_completion ~= "OK" then  -- its client left
    stats:incr("cc:" .. ctx.service, 1, 0)
    mark("s:" .. ctx.service)
  end
end

-- error_page targets for requests nginx refused itself (malformed, or the body too large)
function _M.client_error(status, message)
  return json_exit(status, message)
end

-- error_page target when the attempts failed before any response byte (ngx.ctx is gone here): 502 or 504
-- when the last one failed after the request was written to its replica (never retried), 503 otherwise
function _M.unavailable()
  local service = ngx.var.corral_service
  local replica = ngx.var.corral_replica or ""
  local refusal = ngx.var.corral_refusal or ""
  local status, message
  if refusal == "budget" then
    status, message = 503, "replica '" .. replica .. "'" .. RETRY.spent_suffix
  else
    status = tonumber(refusal)
    if not status and (last_number(ngx.var.upstream_bytes_sent) or 0) > 0 then  -- nginx passed no POST on
      status = last_number(ngx.var.upstream_status) == 504 and 504 or 502
    end
    if status then
      message = "replica '" .. replica .. "'" .. RETRY.not_retried[status]
    else
      local route = routes()[service]
      status, message = 503, route and route.message or ("service '" .. service .. "' not found")
    end
  end
  reject(service, status)
  return json_exit(status, message)
end

-- control channel (a unix socket, mode 0600 in a 0700 directory) ------------------------------------
local function request_body()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body then return body end
  local path = ngx.req.get_body_file()  -- a body larger than client_body_buffer_size is spooled to a file
  if not path then return nil end
  local file = io.open(path, "rb")
  if not file then return nil end
  body = file:read("*a")
  file:close()
  return body
end

-- The control channel's secret (nginx_plane.control_secret), from nginx's environment at init: every control call
-- carries it in X-Corral-Control; compared in constant time.
local CONTROL_SECRET = os.getenv("CORRAL_CONTROL_SECRET")

local function control_allowed()
  local given = ngx.var.http_x_corral_control
  if CONTROL_SECRET and CONTROL_SECRET ~= "" and type(given) == "string" and #given == #CONTROL_SECRET then
    local diff = 0
    for i = 1, #given do diff = bit.bor(diff, bit.bxor(given:byte(i), CONTROL_SECRET:byte(i))) end
    if diff == 0 then return true end
  end
  json_exit(403, "the control channel needs its secret (X-Corral-Control)")
  return false
end

local function answer_version(version)
  ngx.header["content-type"] = "application/json"
  ngx.say(cjson.encode({ version = version }))
end

-- POST /routes?version=N with the table as JSON. Versions only go forward: a stale push (e.g. one
-- queued while nginx was stopped) never replaces a newer table. Answers the version now served.
function _M.set_routes()
  if not control_allowed() then return end
  local version = tonumber(ngx.var.arg_version)
  if not version then return json_exit(400, "?version=<n> is required") end
  local body = request_body()
  local decoded = body and cjson.decode(body)
  if type(decoded) ~= "table" then return json_exit(400, "body must be the routing table as JSON") end
  for _ = 1, 1000 do  -- one writer at a time across workers (the lock expires by itself)
    if routes_dict:add("lock", true, 5) then break end
    ngx.sleep(0.001)
  end
  local current = routes_dict:get("version") or 0
  -- `replace=1`: the control plane repairs a table it never pushed (a version above its own), see sync.py
  if version > current or ngx.var.arg_replace == "1" then
    local ok, err = routes_dict:set("table", body)
    if not ok then
      routes_dict:delete("lock")
      return json_exit(507, "the routing table does not fit in shared memory: " .. tostring(err))
    end
    routes_dict:set("version", version)
    current = version
    wake_all()  -- a replica may have been assigned: the requests this worker holds check again
  end
  routes_dict:delete("lock")
  answer_version(current)
end

-- the engines' figures per replica (replica_picking.ReplicaInputs), pushed every second while they change
function _M.set_inputs()
  if not control_allowed() then return end
  local body = request_body()
  if type(body and cjson.decode(body)) ~= "table" then return json_exit(400, "body must be the replicas' inputs as JSON") end
  local ok, err = routes_dict:set("inputs", body)
  if not ok then return json_exit(507, "the replicas' inputs do not fit in shared memory: " .. tostring(err)) end
  routes_dict:incr("inputs_seq", 1, 0)
  ngx.say("{}")
end

function _M.get_version()
  if not control_allowed() then return end
  answer_version(routes_dict:get("version") or 0)
end

-- GET /stats?since=<seq>&epoch=<epoch>: the units logged after `since` (all of them after a start: the
-- first read, or `epoch` not this nginx's), as {epoch, seq, full, units = {unit = {key = value}}}. The reader
-- sends the `seq` of its last answer as `since`: the log entries up to it are dropped then (an answer lost
-- on its way is read again). A log entry being written (its number taken, not yet set) ends the answer
-- there; one missing for a second is skipped.
local PAIR_KEYS = { "rq", "er", "lt", "ts", "tk", "tu", "ip" }
local REPLICA_KEYS = { "if", "ej", "ea", "en", "ew", "ot", "oc", "cp" }
local REPLICA_INTERNAL = { "sp", "pf", "pp", "cs" }
local SERVICE_KEYS = { "hq", "hs", "cc" }
local METER_KEYS = { "mq", "mp", "mc", "me" }  -- per "<service>|<key id>": requests, prompt/completion tokens, errors
local REJECTED = { 400, 401, 404, 413, 429, 502, 503, 504 }
local UNIT_OF = { rq = "p", er = "p", lt = "p", ts = "p", tk = "p", tu = "p", ip = "p", lb = "p", tb = "p",
                  ["if"] = "r", ej = "r", ea = "r", en = "r", ew = "r", ot = "r", oc = "r", cp = "r",
                  hq = "s", hs = "s", cc = "s", hb = "s", rj = "s", mq = "m", mp = "m", mc = "m", me = "m" }

-- the keys of a unit, with `fn(key)` each
local function each_key(unit, fn, internal)
  local kind, rest = unit:sub(1, 1), unit:sub(3)
  if kind == "p" then
    for _, k in ipairs(PAIR_KEYS) do fn(k .. ":" .. rest) end
    for i = 0, #BUCKETS - 1 do
      fn("lb:" .. rest .. "|" .. i)
      fn("tb:" .. rest .. "|" .. i)
    end
  elseif kind == "r" then
    for _, k in ipairs(REPLICA_KEYS) do fn(k .. ":" .. rest) end
    if internal then for _, k in ipairs(REPLICA_INTERNAL) do fn(k .. ":" .. rest) end end
  elseif kind == "s" then
    for _, k in ipairs(SERVICE_KEYS) do fn(k .. ":" .. rest) end
    for i = 0, #BUCKETS - 1 do fn("hb:" .. rest .. "|" .. i) end
    for _, code in ipairs(REJECTED) do fn("rj:" .. rest .. "|" .. code) end
  elseif kind == "m" then
    for _, k in ipairs(METER_KEYS) do fn(k .. ":" .. rest) end
  end
end

local function read_unit(unit)
  local values = {}
  each_key(unit, function(key)
    local value = stats:get(key)
    if value ~= nil then values[key] = value end
  end)
  return values
end

-- the unit a key belongs to (nil: bookkeeping)
local function unit_of_key(key)
  local kind, rest = key:match("^(%a+):(.*)$")
  local unit = kind and UNIT_OF[kind]
  if not unit then return nil end
  if kind == "lb" or kind == "tb" or kind == "hb" or kind == "rj" then rest = rest:match("^(.*)|[^|]*$") or rest end
  return unit .. ":" .. rest
end

local function epoch()
  local value = stats:get("epoch")
  if not value then
    stats:add("epoch", string.format("%.6f-%d", ngx.now(), math.random(1000000000)))
    value = stats:get("epoch")
  end
  return value
end

function _M.get_stats()
  if not control_allowed() then return end
  local now_epoch = epoch()
  local since = tonumber(ngx.var.arg_since)
  local acked = stats:get("acked") or 0
  local full = since == nil or ngx.var.arg_epoch ~= now_epoch or since < acked
  local seq = stats:get("seq") or 0
  local units, last = {}, acked
  if not full then
    for k = acked + 1, since do stats:delete("c:" .. k) end
    stats:set("acked", since)
    last = since
  end
  ngx.update_time()
  for k = last + 1, seq do
    local unit = stats:get("c:" .. k)
    if unit == nil then
      local gap = stats:get("g:" .. k)
      if not gap then stats:set("g:" .. k, ngx.now(), 10) end
      if not gap or ngx.now() - gap < 1 then break end
    else
      stats:delete("d:" .. unit)  -- first: a change after it logs the unit again
      if not full and units[unit] == nil then units[unit] = read_unit(unit) end
      if full then stats:delete("c:" .. k) end
    end
    last = k
  end
  if full then  -- every unit (a scan of the whole dict: only after a start)
    stats:set("acked", last)
    for _, key in ipairs(stats:get_keys(0)) do
      local unit = unit_of_key(key)
      if unit then
        local values = units[unit]
        if not values then
          values = {}
          units[unit] = values
        end
        values[key] = stats:get(key)
      end
    end
  end
  ngx.header["content-type"] = "application/json"
  ngx.say(cjson.encode({ epoch = now_epoch, seq = last, full = full, units = units }))
end

-- POST /prune with {"units": [...]}: drop the counters of replicas and services that left (the control plane
-- decides when: after the load window read their last counts, with nothing in flight)
function _M.prune()
  if not control_allowed() then return end
  local body = request_body()
  local decoded = body and cjson.decode(body)
  if type(decoded) ~= "table" or type(decoded.units) ~= "table" then
    return json_exit(400, "body must be {\"units\": [...]}")
  end
  local pruned = 0
  for _, unit in ipairs(decoded.units) do
    if type(unit) == "string" then
      each_key(unit, function(key) stats:delete(key) end, true)
      stats:delete("d:" .. unit)
      pruned = pruned + 1
    end
  end
  ngx.header["content-type"] = "application/json"
  ngx.say(cjson.encode({ pruned = pruned }))
end

-- GET /keys-used: key id → when a request last presented it (epoch seconds), for the keys' `lastUsedAt`. Scans the
-- quota dict (it is read when someone lists keys, not per request).
function _M.keys_used()
  if not control_allowed() then return end
  local used = {}
  for _, key in ipairs(quota:get_keys(0)) do
    if key:sub(1, 2) == "u:" then used[key:sub(3)] = quota:get(key) end
  end
  ngx.header["content-type"] = "application/json"
  ngx.say(next(used) and cjson.encode(used) or "{}")
end

-- GET /quota: the quota windows of the current minute and day ({key = count}); POST /quota with the same shape:
-- add the windows this nginx lacks (a restart emptied its shared memory), keeping every count it has.
function _M.quota_windows()
  if not control_allowed() then return end
  ngx.update_time()
  local now = ngx.now()
  local minute, day = math.floor(now / 60), math.floor(now / 86400)
  if ngx.req.get_method() == "POST" then
    local body = request_body()
    local decoded = body and cjson.decode(body)
    if type(decoded) ~= "table" then return json_exit(400, "body must be {key: count}") end
    local added = 0
    for key, value in pairs(decoded) do
      local kind, stamp = key:sub(1, 2), tonumber(key:match("|(%d+)$"))
      if type(value) == "number" and stamp and (((kind == "r:" or kind == "t:") and stamp == minute)
                                                 or (kind == "d:" and stamp == day)) then
        if quota:add(key, value, kind == "d:" and 2 * 86400 or 120) then added = added + 1 end
      end
    end
    ngx.header["content-type"] = "application/json"
    ngx.say(cjson.encode({ added = added }))
    return
  end
  local windows = {}
  for _, key in ipairs(quota:get_keys(0)) do
    local kind, stamp = key:sub(1, 2), tonumber(key:match("|(%d+)$"))
    if ((kind == "r:" or kind == "t:") and stamp == minute) or (kind == "d:" and stamp == day) then
      windows[key] = quota:get(key)
    end
  end
  ngx.header["content-type"] = "application/json"
  ngx.say(next(windows) and cjson.encode(windows) or "{}")
end

return _M
