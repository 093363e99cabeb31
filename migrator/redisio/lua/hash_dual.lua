-- Dual writes from the shim, one script per call: KEYS[1] first, then KEYS[2] is set to the
-- value KEYS[1] ended with. Until cleaning KEYS[1] is the source and KEYS[2] the members'
-- shard; in cleaning, before the old key is retired, the shim swaps them (the shards are the
-- truth from then on). ARGV[1] = op, then the op's arguments; every member named routes to the
-- one shard key.
-- Setting the second key to the first one's result (never applying the same delta twice) keeps
-- `shard[f] == source[f]` after every script; while the copy may run, a delete leaves a
-- TOMBSTONE in the shard instead (op hdel_mark). So every member a dual write touched is in
-- its shard, as a value or a mark, and the copy, which only inserts what a shard lacks, never
-- touches it again (copier.py has the argument). Both orders keep this, so instances in neighbouring phases (cutover:
-- source first; cleaning: shard first) may run side by side; shards-only writers run only
-- beside shard-first ones (Runner.cleanup's second barrier), for which the shard is the truth.
-- A fenced call names the job's control record as KEYS[3] and, as its last ARGV, the epoch of
-- the record it was routed by; it runs only while that epoch is current. A call held up past
-- the runner's next step (its instance silent for longer than the live window, so the
-- barriers went on without it) would otherwise write by a routing nobody uses any more: an
-- increment landing on an old key cleanup removed, a shard rollback removed. Refused, it
-- wrote nothing, and the shim routes it again by the current record.
local last = #ARGV
if KEYS[3] then
  local current = redis.call('HGET', KEYS[3], 'epoch')
  if current ~= ARGV[last] then
    return redis.error_reply('MIGRATORSTALE routed by epoch ' .. ARGV[last] .. ', now ' ..
      tostring(current))
  end
  last = last - 1
end
local op = ARGV[1]
local first, second = KEYS[1], KEYS[2]
-- A script is not undone by an error: with the second key of another type (a shard key
-- written outside the shim), the first would be written and the call still fail, and an app
-- retrying an increment would apply it twice. Both keys are checked before anything is.
for _, key in ipairs({first, second}) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'hash' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind ..
      ', not a hash: nothing was written')
  end
end
local result
if op == 'hset' then
  result = call_parts('HSET', first, ARGV, 2, last, 2)
  call_parts('HSET', second, ARGV, 2, last, 2)
elseif op == 'hdel' then
  result = call_parts('HDEL', first, ARGV, 2, last, 1)
  call_parts('HDEL', second, ARGV, 2, last, 1)
  return result
elseif op == 'hdel_mark' then
  -- dual_write, copying: a member the source held is marked in the shard, so that no value
  -- the copy scanned before this delete can be inserted after it. (One the source lacked was
  -- marked by the delete that removed it, or never scanned.) One member per call: no limit on
  -- how many a delete names.
  result = 0
  for i = 2, last do
    if redis.call('HDEL', first, ARGV[i]) == 1 then
      result = result + 1
      redis.call('HSET', second, ARGV[i], TOMBSTONE)
    end
  end
elseif op == 'hincrby' then
  -- The value as the server holds it, not HINCRBY's reply: that becomes a Lua number, a
  -- double, exact only below 2^53 (a nanosecond timestamp, a Snowflake id would be rounded).
  redis.call('HINCRBY', first, ARGV[2], ARGV[3])
  result = redis.call('HGET', first, ARGV[2])
  redis.call('HSET', second, ARGV[2], result)
elseif op == 'hincrbyfloat' then
  result = redis.call('HINCRBYFLOAT', first, ARGV[2], ARGV[3])
  redis.call('HSET', second, ARGV[2], result)
elseif op == 'hsetnx' then
  result = redis.call('HSETNX', first, ARGV[2], ARGV[3])
  redis.call('HSET', second, ARGV[2], redis.call('HGET', first, ARGV[2]))
else
  return redis.error_reply('migrator: unknown dual-write op ' .. tostring(op))
end
follow_ttl(deadline_ms(first), second)
return result
