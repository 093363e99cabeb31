-- Make the named members of the shards equal to the source, atomically: verify --repair.
-- KEYS[1] = source, then the shard keys the members name (only those: a plan may have
-- thousands of shards, and every key of a call costs before the script runs).
-- ARGV = member, its shard's KEYS index, the KEYS index of the shard it was found in (0:
-- none), ... (the runner routes members; an extra in a wrong shard is removed).
-- The value written is the source's value read in this same script, so it can neither
-- overwrite a newer value nor resurrect a deleted member (one the source lacks is removed from
-- its shard, a delete mark with it).
-- Returns {members_written, members_removed, elapsed_us}.
local t0 = now_us()
local deadline = deadline_ms(KEYS[1])
local written, removed = 0, 0
for i = 1, #ARGV, 3 do
  local f = ARGV[i]
  local shard = KEYS[tonumber(ARGV[i + 1])]
  local found = tonumber(ARGV[i + 2])
  local v = redis.call('HGET', KEYS[1], f)
  if v then
    redis.call('HSET', shard, f, v)
    follow_ttl(deadline, shard)
    written = written + 1
  else
    removed = removed + redis.call('HDEL', shard, f)
  end
  if found > 0 and KEYS[found] ~= shard then
    removed = removed + redis.call('HDEL', KEYS[found], f)
  end
end
return {written, removed, now_us() - t0}
