"""The Lua scripts that hand work to workers (`redis_store.py`; the keys and the shared helpers are in
`redis_lua.py`): the claim (reclaiming a dead worker's entry, promoting backed-off jobs, fairness
inside a lane), binding what a blocked XREADGROUP delivered, the heartbeat that renews a lease, and
a stopping process's release.
"""

from __future__ import annotations

from imagegate.jobs.redis_lua import COMMON

__all__ = ["BIND", "CLAIM", "FORGET", "RELEASE", "RENEW", "UNBLOCK"]

# Taking work: fairness inside a lane, binding a job to the entry that now sits in `owner`'s pending list.
_TAKE = """
local function best_in(lane)  -- the oldest due job of the lane's key with the fewest running jobs
  local best, bestn, bests, bkey = nil, 0, 0, nil
  for _, key in ipairs(redis.call('SMEMBERS', P .. 'readykeys:' .. lane)) do
    local head = redis.call('ZRANGE', P .. 'ready:' .. lane .. ':' .. key, 0, 0, 'WITHSCORES')
    if head[1] then
      local n = tonumber(redis.call('HGET', P .. 'running', key) or '0')
      local s = tonumber(head[2])
      if best == nil or n < bestn or (n == bestn and s < bests) then best, bestn, bests, bkey = head[1], n, s, key end
    end
  end
  return best, bestn, bests, bkey
end
local function loaded(id) return {redis.call('HGETALL', jk(id)), redis.call('HGETALL', P .. 'handles:' .. id)} end
local function take(id, lane, key, entry, owner, lease)
  unready(id, lane, key)
  local k = jk(id)
  if redis.call('HGET', k, 'status') == 'queued' then
    count('queued', -1)
    count('in_progress', 1)
    redis.call('ZREM', P .. 'queued', id)
  end
  running(key, 1)
  local t = now()
  redis.call('HSET', k, 'status', 'in_progress', 'lease_owner', owner, 'lease_until', f6(t + lease), 'entry', entry)
  redis.call('HSETNX', k, 'started_at', f6(t))
  redis.call('HINCRBY', k, 'attempts', 1)
  redis.call('HSET', P .. 'bound', lane .. ' ' .. entry, id)
  return loaded(id)
end
local function adopt(lane, entry, owner, lease)  -- an entry reclaimed for owner: its job, resumed; or a ticket
  local id = redis.call('HGET', P .. 'bound', lane .. ' ' .. entry)
  if id then
    local f = redis.call('HMGET', jk(id), 'status', 'entry')
    if f[1] == 'in_progress' and f[2] == entry then
      redis.call('HSET', jk(id), 'lease_owner', owner, 'lease_until', f6(now() + lease))
      redis.call('HINCRBY', jk(id), 'attempts', 1)
      return loaded(id)
    end
    drop(lane, entry)
    return nil
  end
  local best, _, _, key = best_in(lane)  -- a ticket its reader never used (it died first)
  if best then return take(best, lane, key, entry, owner, lease) end
  drop(lane, entry)
  return nil
end
"""

# ARGV: P, owner, lease seconds, longest wait (0: do not prepare to block), n excluded lanes,
# excluded lane..., known lane...
# -> {job fields, handles} | {false, seconds a reader may block, lanes to read}
CLAIM = COMMON + _TAKE + """
local owner, lease, limit, nex = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local excluded = {}
for i = 6, 5 + nex do excluded[ARGV[i]] = true end
for i = 6 + nex, #ARGV do redis.call('SADD', P .. 'lanes', ARGV[i]) end
if redis.call('EXISTS', P .. 'leases') == 1 then  -- jobs running under leases (before streams): due again
  for _, id in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
    local f = redis.call('HMGET', jk(id), 'lane', 'key', 'seq', 'status', 'entry')
    if f[4] == 'in_progress' and not f[5] then
      running(f[2], -1)
      ready(id, f[1], f[2], f[3])
    end
  end
  redis.call('DEL', P .. 'leases')
end
local t = now()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', f6(t), 'LIMIT', 0, 500)) do
  redis.call('ZREM', P .. 'delayed', id)  -- its backoff is over: due, with a ticket
  local f = redis.call('HMGET', jk(id), 'lane', 'key', 'seq', 'status')
  if f[4] == 'queued' then ready(id, f[1], f[2], f[3]) end
end
local lanes = {}
for _, lane in ipairs(redis.call('SMEMBERS', P .. 'lanes')) do
  if not excluded[lane] then
    stream(lane)
    lanes[#lanes + 1] = lane
  end
end
table.sort(lanes)
local idle = math.max(1, math.floor(lease * 1000))
-- 1. entries idle past the lease (their worker stopped renewing them): resumed here. XPENDING IDLE
-- finds the first one wherever it is in the pending list (the server scans it, not this script, so
-- a claim costs little with thousands of jobs running); each one taken is resumed or dropped.
for _, lane in ipairs(lanes) do
  for _ = 1, 100 do
    local p = redis.call('XPENDING', sk(lane), G, 'IDLE', idle, '-', '+', 1)[1]
    if not p then break end
    redis.call('XCLAIM', sk(lane), G, owner, idle, p[1], 'JUSTID')
    local job = adopt(lane, p[1], owner, lease)
    if job then return job end
  end
end
-- 2. new work: the lane whose next job comes first (its key runs the fewest, then the oldest)
local order = {}
for _, lane in ipairs(lanes) do
  local best, n, s, key = best_in(lane)
  if best then
    order[#order + 1] = {lane, n, s, best, key}
  else  -- nothing due: the lane's unread tickets are stale (their jobs were canceled while queued)
    local r = redis.call('XREADGROUP', 'GROUP', G, owner, 'COUNT', 100, 'STREAMS', sk(lane), '>')
    if r then for _, e in ipairs(r[1][2]) do drop(lane, e[1]) end end
  end
end
table.sort(order, function(a, b) return a[2] < b[2] or (a[2] == b[2] and a[3] < b[3]) end)
for _, o in ipairs(order) do
  local r = redis.call('XREADGROUP', 'GROUP', G, owner, 'COUNT', 1, 'STREAMS', sk(o[1]), '>')
  if r then return take(o[4], o[1], o[5], r[1][2][1][1], owner, lease) end
end
if limit <= 0 then return {false} end
-- 3. nothing to take: a reader blocks until the next backoff ends or another worker's lease runs out,
-- and no longer than a lease (an entry delivered meanwhile cannot pass the lease any sooner)
local wait = math.min(limit, lease)
local head = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')
if head[1] then wait = math.min(wait, tonumber(head[2]) - t) end
for _, lane in ipairs(lanes) do
  for _, p in ipairs(redis.call('XPENDING', sk(lane), G, '-', '+', 1000)) do
    if p[2] ~= owner then wait = math.min(wait, (idle - tonumber(p[3])) / 1000) end
  end
end
local w = P .. 'wake:' .. owner
if redis.call('EXISTS', w) == 0 then redis.call('XGROUP', 'CREATE', w, G, '0', 'MKSTREAM') end
redis.call('EXPIRE', w, 3600)
return {false, string.format('%.3f', math.max(wait, 0.001)), lanes}
"""

# What a blocked XREADGROUP delivered. ARGV: P, owner, lease seconds, n wake entries, wake entry...,
# lane, entry, lane, entry... -> {job fields, handles} | false
BIND = COMMON + _TAKE + """
local owner, lease, nw = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local w = P .. 'wake:' .. owner
for i = 5, 4 + nw do
  redis.call('XACK', w, G, ARGV[i])
  redis.call('XDEL', w, ARGV[i])
end
local pick, pn, ps, pkey, plane, pentry = nil, 0, 0, nil, nil, nil
for i = 5 + nw, #ARGV, 2 do
  local best, n, s, key = best_in(ARGV[i])
  if best and (pick == nil or n < pn or (n == pn and s < ps)) then
    pick, pn, ps, pkey, plane, pentry = best, n, s, key, ARGV[i], ARGV[i + 1]
  end
end
for i = 5 + nw, #ARGV, 2 do
  if ARGV[i] ~= plane or ARGV[i + 1] ~= pentry then  -- one job per read: the other tickets go back
    drop(ARGV[i], ARGV[i + 1])
    if redis.call('SCARD', P .. 'readykeys:' .. ARGV[i]) > 0 then ticket(ARGV[i]) end
  end
end
if pick then return take(pick, plane, pkey, pentry, owner, lease) end
return false
"""

# ARGV: P, id, owner, lease seconds  -> -1 not ours, else cancel_requested (0/1)
RENEW = COMMON + """
local id = ARGV[2]
local f = redis.call('HMGET', jk(id), 'status', 'lease_owner', 'cancel_requested', 'lane', 'entry')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[3] or not f[5] then return -1 end
-- the owner claims its own entry again: its idle time (the visibility timeout) starts over
if #redis.call('XCLAIM', sk(f[4]), G, ARGV[3], 0, f[5], 'JUSTID') == 0 then return -1 end
redis.call('HSET', jk(id), 'lease_until', f6(now() + tonumber(ARGV[4])))
if f[3] == '1' then return 1 end
return 0
"""

# A stopping process: its pending entries become idle past any lease (the next claim anywhere
# resumes them) and a ticket per entry wakes a blocked reader. ARGV: P, owner
RELEASE = COMMON + """
local n = 0
for _, lane in ipairs(streams()) do
  for _, p in ipairs(redis.call('XPENDING', sk(lane), G, '-', '+', 10000, ARGV[2])) do
    redis.call('XCLAIM', sk(lane), G, ARGV[2], 0, p[1], 'IDLE', '1000000000000', 'JUSTID')
    ticket(lane)
    n = n + 1
  end
end
redis.call('DEL', P .. 'wake:' .. ARGV[2])
return n
"""

# ARGV: P, owner: end the owner's blocked XREADGROUP (or the next one: the entry waits unread)
UNBLOCK = COMMON + """
local w = P .. 'wake:' .. ARGV[2]
if redis.call('EXISTS', w) == 0 then redis.call('XGROUP', 'CREATE', w, G, '0', 'MKSTREAM') end
redis.call('XADD', w, 'MAXLEN', 1, '*', 'wake', 1)
redis.call('EXPIRE', w, 3600)
return 1
"""

# ARGV: P, idle ms: forget consumers (processes) with nothing pending that were not seen for that long
FORGET = COMMON + """
local n = 0
for _, lane in ipairs(streams()) do
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', sk(lane), G)) do
    local info = {}
    for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
    if tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[2]) then
      redis.call('XGROUP', 'DELCONSUMER', sk(lane), G, info['name'])
      n = n + 1
    end
  end
end
return n
"""
