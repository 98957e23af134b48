"""The Lua scripts of the Redis job engine (`redis_store.py`): every state change of a job is one
script, so it is atomic on the server and no two processes can interleave a read-modify-write.
Here: the keys, the helpers every script starts with (`COMMON`) and the job records' changes;
handing work to workers (claim, bind, renew, release) is in `redis_lua_claim.py`.

Keys, all under `P` = `redis.key_prefix` + `jobs:` (passed as ARGV[1]):
    job:<id>             hash: the job's fields (JSON columns as JSON text; `entry`: its stream entry)
    handles:<id>         hash: upstream handle key -> JSON handle (what a resumed job follows)
    req:<id>             the request (JSON, images in base64), dropped when the job finishes
    seq                  the insertion counter (a job's `seq`)
    bykey:<key>          zset seq -> id: one client key's jobs (listing)
    queued               zset seq -> id: every queued job (queue positions)
    delayed              zset not_before -> id: queued jobs waiting out a backoff (no ticket yet)
    ready:<lane>:<key>   zset seq -> id: due jobs of one lane and client key
    readykeys:<lane>     set of client keys with due jobs in a lane; `lanes` the set of lanes
    stream:<lane>        stream with consumer group `workers`: one ticket per due job of the lane;
                         a running job is its ticket's entry, pending for the worker (consumer)
    bound                hash "<lane> <entry id>" -> the job id that entry holds
    wake:<owner>         stream (group `workers`): ends one process's blocked XREADGROUP
    running              hash key -> running jobs (fairness)
    counts               hash status -> jobs
    finished             zset finished_at -> id (retention); webhooks: zset due -> id
    idem                 hash "<key>\\n<idempotency key>" -> id
"""

from __future__ import annotations

__all__ = [
    "ADD", "COMMON", "DUE_WEBHOOKS", "FINISH", "GROUP", "PURGE", "REQUEST_CANCEL", "REQUEUE", "SAVE_HANDLE",
    "SAVE_WEBHOOK",
]

GROUP = "workers"

COMMON = """
local P = ARGV[1]
local G = 'workers'
local function jk(id) return P .. 'job:' .. id end
local function sk(lane) return P .. 'stream:' .. lane end
local function now() local t = redis.call('TIME'); return tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local function f6(x) return string.format('%.6f', x) end
local function stream(lane)  -- the lane's stream, made with its consumer group on first use
  local s = sk(lane)
  if redis.call('EXISTS', s) == 0 then
    redis.call('XGROUP', 'CREATE', s, G, '0', 'MKSTREAM')
    for _, key in ipairs(redis.call('SMEMBERS', P .. 'readykeys:' .. lane)) do  -- due before streams: a ticket each
      for _ = 1, redis.call('ZCARD', P .. 'ready:' .. lane .. ':' .. key) do
        redis.call('XADD', s, '*', 'lane', lane)
      end
    end
  end
  return s
end
local function streams()  -- the lanes that have a stream
  local out = {}
  for _, lane in ipairs(redis.call('SMEMBERS', P .. 'lanes')) do
    if redis.call('EXISTS', sk(lane)) == 1 then out[#out + 1] = lane end
  end
  return out
end
local function ticket(lane) redis.call('XADD', stream(lane), '*', 'lane', lane) end
local function ready(id, lane, key, seq)  -- due: waits in its key's set, and a ticket wakes a reader
  stream(lane)  -- made first: a stream made now gives the jobs already due their tickets, not this one
  redis.call('ZADD', P .. 'ready:' .. lane .. ':' .. key, seq, id)
  redis.call('SADD', P .. 'readykeys:' .. lane, key)
  redis.call('SADD', P .. 'lanes', lane)
  ticket(lane)
end
local function unready(id, lane, key)
  local r = P .. 'ready:' .. lane .. ':' .. key
  if redis.call('ZREM', r, id) == 1 then
    if redis.call('ZCARD', r) == 0 then redis.call('SREM', P .. 'readykeys:' .. lane, key) end
  end
end
local function drop(lane, entry)  -- done with an entry: out of the pending list, out of the stream
  redis.call('XACK', sk(lane), G, entry)
  redis.call('XDEL', sk(lane), entry)
  redis.call('HDEL', P .. 'bound', lane .. ' ' .. entry)
end
local function count(status, n) redis.call('HINCRBY', P .. 'counts', status, n) end
local function running(key, n) redis.call('HINCRBY', P .. 'running', key, n) end
"""

# ARGV: P, id, key, idempotency key ('' none), lane, request JSON, now, not_before, field, value, ...
ADD = COMMON + """
local id, key, idem, lane = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if idem ~= '' then
  local found = redis.call('HGET', P .. 'idem', key .. '\\n' .. idem)
  if found then return {0, found} end
end
local seq = redis.call('INCR', P .. 'seq')
for i = 9, #ARGV, 2 do redis.call('HSET', jk(id), ARGV[i], ARGV[i + 1]) end
redis.call('HSET', jk(id), 'seq', seq, 'status', 'queued')
redis.call('SET', P .. 'req:' .. id, ARGV[6])
redis.call('ZADD', P .. 'bykey:' .. key, seq, id)
redis.call('ZADD', P .. 'queued', seq, id)
count('queued', 1)
if tonumber(ARGV[8]) > tonumber(ARGV[7]) then
  redis.call('ZADD', P .. 'delayed', ARGV[8], id)
else
  ready(id, lane, key, seq)
end
if idem ~= '' then redis.call('HSET', P .. 'idem', key .. '\\n' .. idem, id) end
return {seq, id}
"""

# ARGV: P, id, handle key, handle JSON, upstream id ('' none), provider ('' none), owner ('' any)
SAVE_HANDLE = COMMON + """
local id = ARGV[2]
if redis.call('EXISTS', jk(id)) == 0 then return 0 end
if ARGV[7] ~= '' and redis.call('HGET', jk(id), 'lease_owner') ~= ARGV[7] then return 0 end
redis.call('HSET', P .. 'handles:' .. id, ARGV[3], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', jk(id), 'upstream_request_id', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', jk(id), 'provider', ARGV[6]) end
return 1
"""

# ARGV: P, id, owner, not_before, error JSON, now
REQUEUE = COMMON + """
local id = ARGV[2]
local k = jk(id)
local f = redis.call('HMGET', k, 'status', 'lease_owner', 'cancel_requested', 'lane', 'key', 'seq', 'entry')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[3] or f[3] == '1' then return 0 end
running(f[5], -1)
if f[7] then drop(f[4], f[7]) end
redis.call('HSET', k, 'status', 'queued', 'lease_until', 0, 'not_before', ARGV[4], 'error', ARGV[5])
redis.call('HDEL', k, 'lease_owner', 'entry')
count('in_progress', -1)
count('queued', 1)
redis.call('ZADD', P .. 'queued', f[6], id)
if tonumber(ARGV[4]) > tonumber(ARGV[6]) then
  redis.call('ZADD', P .. 'delayed', ARGV[4], id)
else
  ready(id, f[4], f[5], f[6])
end
return 1
"""

# ARGV: P, id, owner ('' = only if still queued), webhook due ('' none), n fields to drop, field..., field, value...
FINISH = COMMON + """
local id = ARGV[2]
local k = jk(id)
local f = redis.call('HMGET', k, 'status', 'lease_owner', 'lane', 'key', 'entry')
if f[1] ~= 'queued' and f[1] ~= 'in_progress' then return 0 end
if ARGV[3] ~= '' then
  if f[2] ~= ARGV[3] then return 0 end
elseif f[1] ~= 'queued' then return 0 end
if f[1] == 'in_progress' then
  running(f[4], -1)
  if f[5] then drop(f[3], f[5]) end
else
  unready(id, f[3], f[4])  -- its ticket stays behind, stale: whoever reads it drops it
end
redis.call('ZREM', P .. 'queued', id)
redis.call('ZREM', P .. 'delayed', id)
count(f[1], -1)
local drop_n = tonumber(ARGV[5])
for i = 6, 5 + drop_n do redis.call('HDEL', k, ARGV[i]) end
for i = 6 + drop_n, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', k, 'lease_owner', 'entry')
redis.call('HSET', k, 'lease_until', 0)
count(redis.call('HGET', k, 'status'), 1)
if ARGV[4] ~= '' then redis.call('ZADD', P .. 'webhooks', ARGV[4], id) else redis.call('ZREM', P .. 'webhooks', id) end
redis.call('ZADD', P .. 'finished', redis.call('HGET', k, 'finished_at'), id)
redis.call('DEL', P .. 'req:' .. id)
return 1
"""

# ARGV: P, id
REQUEST_CANCEL = COMMON + """
if redis.call('EXISTS', jk(ARGV[2])) == 1 then redis.call('HSET', jk(ARGV[2]), 'cancel_requested', 1) end
return 0
"""

# ARGV: P, before, batch
PURGE = COMMON + """
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])) do
  if not redis.call('ZSCORE', P .. 'webhooks', id) then
    local f = redis.call('HMGET', jk(id), 'key', 'idempotency_key', 'status')
    if f[1] then
      redis.call('ZREM', P .. 'bykey:' .. f[1], id)
      if f[2] then redis.call('HDEL', P .. 'idem', f[1] .. '\\n' .. f[2]) end
      count(f[3], -1)
    end
    redis.call('DEL', jk(id), P .. 'handles:' .. id, P .. 'req:' .. id)
    redis.call('ZREM', P .. 'finished', id)
    n = n + 1
  end
end
return n
"""

# ARGV: P, now, limit, held until
DUE_WEBHOOKS = COMMON + """
local ids = redis.call('ZRANGEBYSCORE', P .. 'webhooks', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', P .. 'webhooks', ARGV[4], id) end
return ids
"""

# ARGV: P, id, webhook JSON, due ('' none)
SAVE_WEBHOOK = COMMON + """
local id = ARGV[2]
if redis.call('EXISTS', jk(id)) == 0 then return 0 end
redis.call('HSET', jk(id), 'webhook', ARGV[3])
if ARGV[4] ~= '' then redis.call('ZADD', P .. 'webhooks', ARGV[4], id) else redis.call('ZREM', P .. 'webhooks', id) end
return 1
"""
