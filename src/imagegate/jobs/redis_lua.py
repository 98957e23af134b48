"""The Lua scripts of the Redis job engine (`redis_store.py`): every state change of a job is one
script, so it is atomic on the server and no two processes can interleave a read-modify-write.

Keys, all under `P` = `redis.key_prefix` + `jobs:` (passed as ARGV[1]):
    job:<id>             hash: the job's fields (JSON columns as JSON text)
    handles:<id>         hash: upstream handle key -> JSON handle (what a resumed job follows)
    req:<id>             the request (JSON, images in base64), dropped when the job finishes
    seq                  the insertion counter (a job's `seq`)
    bykey:<key>          zset seq -> id: one client key's jobs (listing)
    queued               zset seq -> id: every queued job (queue positions)
    delayed              zset not_before -> id: queued jobs waiting out a backoff
    ready:<lane>:<key>   zset seq -> id: due jobs of one lane and client key
    readykeys:<lane>     set of client keys with due jobs in a lane; `lanes` the set of lanes
    leases               zset lease_until -> id: running jobs
    running              hash key -> running jobs (fairness)
    counts               hash status -> jobs
    finished             zset finished_at -> id (retention); webhooks: zset due -> id
    idem                 hash "<key>\\n<idempotency key>" -> id
"""

from __future__ import annotations

_COMMON = """
local P = ARGV[1]
local function jk(id) return P .. 'job:' .. id end
local function ready(id, lane, key, seq)
  redis.call('ZADD', P .. 'ready:' .. lane .. ':' .. key, seq, id)
  redis.call('SADD', P .. 'readykeys:' .. lane, key)
  redis.call('SADD', P .. 'lanes', lane)
end
local function unready(id, lane, key)
  local r = P .. 'ready:' .. lane .. ':' .. key
  if redis.call('ZREM', r, id) == 1 then
    if redis.call('ZCARD', r) == 0 then redis.call('SREM', P .. 'readykeys:' .. lane, key) end
    return true
  end
  return false
end
local function clock(plus)  -- the server's time: leases do not depend on the workers' clocks
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  return string.format('%.6f', now), string.format('%.6f', now + plus)
end
local function count(status, n) redis.call('HINCRBY', P .. 'counts', status, n) end
local function running(key, n) redis.call('HINCRBY', P .. 'running', key, n) end
"""

# ARGV: P, id, key, idempotency key ('' none), lane, request JSON, now, not_before, field, value, ...
ADD = _COMMON + """
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

# ARGV: P, owner, lease seconds, excluded lane, ...
CLAIM = _COMMON + """
local owner = ARGV[2]
local now, lease_until = clock(tonumber(ARGV[3]))
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, 500)) do
  redis.call('ZREM', P .. 'delayed', id)
  local f = redis.call('HMGET', jk(id), 'lane', 'key', 'seq', 'status')
  if f[4] == 'queued' then ready(id, f[1], f[2], f[3]) end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', '(' .. now, 'LIMIT', 0, 500)) do
  redis.call('ZREM', P .. 'leases', id)  -- its worker stopped renewing: due again, with its handles
  local f = redis.call('HMGET', jk(id), 'lane', 'key', 'seq', 'status')
  if f[4] == 'in_progress' then
    ready(id, f[1], f[2], f[3])
    running(f[2], -1)
  end
end
local excluded = {}
for i = 4, #ARGV do excluded[ARGV[i]] = true end
local best, bestn, bests, blane, bkey = nil, 0, 0, nil, nil
for _, lane in ipairs(redis.call('SMEMBERS', P .. 'lanes')) do
  if not excluded[lane] then
    for _, key in ipairs(redis.call('SMEMBERS', P .. 'readykeys:' .. lane)) do
      local head = redis.call('ZRANGE', P .. 'ready:' .. lane .. ':' .. key, 0, 0, 'WITHSCORES')
      if head[1] then
        local n = tonumber(redis.call('HGET', P .. 'running', key) or '0')
        local s = tonumber(head[2])
        if best == nil or n < bestn or (n == bestn and s < bests) then
          best, bestn, bests, blane, bkey = head[1], n, s, lane, key
        end
      end
    end
  end
end
if not best then return false end
unready(best, blane, bkey)
local k = jk(best)
if redis.call('HGET', k, 'status') == 'queued' then
  count('queued', -1)
  count('in_progress', 1)
  redis.call('ZREM', P .. 'queued', best)
end
running(bkey, 1)
redis.call('HSET', k, 'status', 'in_progress', 'lease_owner', owner, 'lease_until', lease_until)
redis.call('HSETNX', k, 'started_at', now)
redis.call('HINCRBY', k, 'attempts', 1)
redis.call('ZADD', P .. 'leases', lease_until, best)
return {redis.call('HGETALL', k), redis.call('HGETALL', P .. 'handles:' .. best)}
"""

# ARGV: P, id, owner, lease seconds  -> -1 not ours, else cancel_requested (0/1)
RENEW = _COMMON + """
local id = ARGV[2]
local f = redis.call('HMGET', jk(id), 'status', 'lease_owner', 'cancel_requested', 'lane', 'key')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[3] then return -1 end
local _, lease_until = clock(tonumber(ARGV[4]))
redis.call('HSET', jk(id), 'lease_until', lease_until)
redis.call('ZADD', P .. 'leases', lease_until, id)
if unready(id, f[4], f[5]) then running(f[5], 1) end
if f[3] == '1' then return 1 end
return 0
"""

# ARGV: P, id, handle key, handle JSON, upstream id ('' none), provider ('' none)
SAVE_HANDLE = _COMMON + """
local id = ARGV[2]
if redis.call('EXISTS', jk(id)) == 0 then return 0 end
redis.call('HSET', P .. 'handles:' .. id, ARGV[3], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', jk(id), 'upstream_request_id', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', jk(id), 'provider', ARGV[6]) end
return 1
"""

# ARGV: P, id, owner, not_before, error JSON, now
REQUEUE = _COMMON + """
local id = ARGV[2]
local k = jk(id)
local f = redis.call('HMGET', k, 'status', 'lease_owner', 'cancel_requested', 'lane', 'key', 'seq')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[3] or f[3] == '1' then return 0 end
if not unready(id, f[4], f[5]) then running(f[5], -1) end
redis.call('ZREM', P .. 'leases', id)
redis.call('HSET', k, 'status', 'queued', 'lease_until', 0, 'not_before', ARGV[4], 'error', ARGV[5])
redis.call('HDEL', k, 'lease_owner')
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
FINISH = _COMMON + """
local id = ARGV[2]
local k = jk(id)
local f = redis.call('HMGET', k, 'status', 'lease_owner', 'lane', 'key')
if f[1] ~= 'queued' and f[1] ~= 'in_progress' then return 0 end
if ARGV[3] ~= '' then
  if f[2] ~= ARGV[3] then return 0 end
elseif f[1] ~= 'queued' then return 0 end
local was_ready = unready(id, f[3], f[4])
if f[1] == 'in_progress' and not was_ready then running(f[4], -1) end
redis.call('ZREM', P .. 'queued', id)
redis.call('ZREM', P .. 'delayed', id)
redis.call('ZREM', P .. 'leases', id)
count(f[1], -1)
local drop = tonumber(ARGV[5])
for i = 6, 5 + drop do redis.call('HDEL', k, ARGV[i]) end
for i = 6 + drop, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', k, 'lease_owner')
redis.call('HSET', k, 'lease_until', 0)
count(redis.call('HGET', k, 'status'), 1)
if ARGV[4] ~= '' then redis.call('ZADD', P .. 'webhooks', ARGV[4], id) else redis.call('ZREM', P .. 'webhooks', id) end
redis.call('ZADD', P .. 'finished', redis.call('HGET', k, 'finished_at'), id)
redis.call('DEL', P .. 'req:' .. id)
return 1
"""

# ARGV: P, owner
RELEASE = _COMMON + """
local n = 0
for _, id in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
  if redis.call('HGET', jk(id), 'lease_owner') == ARGV[2] then
    redis.call('HSET', jk(id), 'lease_until', 0)
    redis.call('ZADD', P .. 'leases', 0, id)
    n = n + 1
  end
end
return n
"""

# ARGV: P, id
REQUEST_CANCEL = _COMMON + """
if redis.call('EXISTS', jk(ARGV[2])) == 1 then redis.call('HSET', jk(ARGV[2]), 'cancel_requested', 1) end
return 0
"""

# ARGV: P, before, batch
PURGE = _COMMON + """
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
DUE_WEBHOOKS = _COMMON + """
local ids = redis.call('ZRANGEBYSCORE', P .. 'webhooks', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', P .. 'webhooks', ARGV[4], id) end
return ids
"""

# ARGV: P, id, webhook JSON, due ('' none)
SAVE_WEBHOOK = _COMMON + """
local id = ARGV[2]
if redis.call('EXISTS', jk(id)) == 0 then return 0 end
redis.call('HSET', jk(id), 'webhook', ARGV[3])
if ARGV[4] ~= '' then redis.call('ZADD', P .. 'webhooks', ARGV[4], id) else redis.call('ZREM', P .. 'webhooks', id) end
return 1
"""
