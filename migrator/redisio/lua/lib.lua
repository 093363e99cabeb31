-- Shared helpers, prepended to every migrator script (see migrator/redisio/scripts.py):
-- time, TTL, and commands of many arguments sent in parts.
-- What a shim writes into a shard in place of a member it deletes while the copy may run
-- (dual_write, copying): the copy inserts only what a shard lacks (HSETNX), so a deleted member
-- must not leave a gap a value scanned before the delete could fill. Equal to
-- migrator.phases.TOMBSTONE; verify's shard pass removes them (hash_missing_members.lua).
local TOMBSTONE = "\0migrator:deleted\0"
local function wall_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- The clock a script measures its own server time with (the runner's budget). Valkey freezes
-- TIME for the whole script (it would always report 0 µs) but offers os.clock(), the server's
-- CPU time; Redis 7 has no os library, and its TIME advances inside a script.
-- (rawget: Redis 7 raises on reading an undeclared global, and an error per call costs.)
local os_lib = rawget(_G, 'os')
local has_clock = os_lib ~= nil and os_lib.clock ~= nil
local function now_us()
  if has_clock then return os.clock() * 1000000 end
  return wall_us()
end
-- Absolute expiry of a key in ms, or nil when it has none. PEXPIRETIME where the server has it
-- (Redis 7+, Valkey), else PTTL + TIME.
local function deadline_ms(key)
  local r = redis.pcall('PEXPIRETIME', key)
  if type(r) == 'number' then
    if r > 0 then return r end
    return nil
  end
  local pttl = redis.call('PTTL', key)
  if pttl > 0 then return math.floor(wall_us() / 1000) + pttl end
  return nil
end
-- Make a key's absolute deadline `deadline` (nil: none), as the source's is: a shard mirrors
-- the source until cleanup, so a deadline the source got, moved or lost since the shard last
-- followed it is followed again. Returns 1 when it changed the key. (Deadlines read through
-- PTTL differ by a ms from call to call: that much is the same deadline.)
local function follow_ttl(deadline, key)
  local own = deadline_ms(key)
  if deadline then
    if own == nil or math.abs(own - deadline) > 1 then
      return redis.call('PEXPIREAT', key, deadline)
    end
  elseif own then
    return redis.call('PERSIST', key)
  end
  return 0
end
-- Lua 5.1's unpack returns fewer than 8,000 values ("too many results to unpack"), so a command
-- with more arguments than that (a shim HSET of thousands of fields, a large page of members)
-- is sent in parts: the script stays one atomic step.
local UNPACK_MAX = 4000
-- redis.call(cmd, key, args[first..last]) in parts of whole items of `step` values each;
-- returns the sum of the integer replies (HSET: fields added, HDEL/SREM/ZREM: removed).
local function call_parts(cmd, key, args, first, last, step)
  local size = UNPACK_MAX - (UNPACK_MAX % step)
  local total = 0
  for i = first, last, size do
    total = total + redis.call(cmd, key, unpack(args, i, math.min(i + size - 1, last)))
  end
  return total
end
-- HMGET key args[first..last], in parts; one reply list.
local function hmget_parts(key, args, first, last)
  local out, n = {}, 0
  for i = first, last, UNPACK_MAX do
    local got = redis.call('HMGET', key, unpack(args, i, math.min(i + UNPACK_MAX - 1, last)))
    for j = 1, #got do
      n = n + 1
      out[n] = got[j]
    end
  end
  return out
end
