-- Dual writes from the shim, one script per call: the source first, then the member's shard is
-- set to the source's resulting value. KEYS[1] = source, KEYS[2] = the members' shard.
-- ARGV[1] = op, then the op's arguments; every member named routes to KEYS[2].
-- Setting the shard to the source's result (never applying the same delta twice) keeps
-- `shard[f] == source[f]` after every script, which is the invariant hash_copy.lua relies on.
-- Except where the shard already holds the member: HINCRBY, HINCRBYFLOAT and HSETNX then apply
-- the same op to it (equal values give equal results, so the invariant holds all the same).
-- That matters while the job moves from cutover to cleaning: instances still in cutover run
-- this script while others already write the shards only (HINCRBY on the shard); setting the
-- shard to the source's total would undo their increments (or an HSET, under HSETNX).
local op = ARGV[1]
local src, shard = KEYS[1], KEYS[2]
local result
if op == 'hset' then
  local args = {}
  for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
  result = redis.call('HSET', src, unpack(args))
  redis.call('HSET', shard, unpack(args))
elseif op == 'hdel' then
  local args = {}
  for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
  result = redis.call('HDEL', src, unpack(args))
  redis.call('HDEL', shard, unpack(args))
  return result
elseif op == 'hincrby' then
  result = redis.call('HINCRBY', src, ARGV[2], ARGV[3])
  if redis.call('HEXISTS', shard, ARGV[2]) == 1 then
    redis.call('HINCRBY', shard, ARGV[2], ARGV[3])
  else
    redis.call('HSET', shard, ARGV[2], result)
  end
elseif op == 'hincrbyfloat' then
  result = redis.call('HINCRBYFLOAT', src, ARGV[2], ARGV[3])
  if redis.call('HEXISTS', shard, ARGV[2]) == 1 then
    redis.call('HINCRBYFLOAT', shard, ARGV[2], ARGV[3])
  else
    redis.call('HSET', shard, ARGV[2], result)
  end
elseif op == 'hsetnx' then
  result = redis.call('HSETNX', src, ARGV[2], ARGV[3])
  if redis.call('HEXISTS', shard, ARGV[2]) == 0 then
    redis.call('HSET', shard, ARGV[2], redis.call('HGET', src, ARGV[2]))
  end
else
  return redis.error_reply('migrator: unknown dual-write op ' .. tostring(op))
end
follow_ttl(deadline_ms(src), shard)
return result
