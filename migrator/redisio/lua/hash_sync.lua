-- Make the named members of the shards equal to the source, atomically: verify --repair.
-- KEYS[1] = source, KEYS[2..N+1] = shards.  ARGV = member, found_shard, member, found_shard, ...
-- found_shard is -1, or the shard a member was seen in (an extra in a wrong shard is removed).
-- The value written is the source's value read in this same script, so it can neither
-- overwrite a newer value nor resurrect a deleted member (one the source lacks is removed from
-- its shard, a delete mark with it).
-- Returns {members_written, members_removed, elapsed_us}.
local t0 = now_us()
local n = #KEYS - 1
local deadline = deadline_ms(KEYS[1])
local written, removed = 0, 0
for i = 1, #ARGV, 2 do
  local f = ARGV[i]
  local found = tonumber(ARGV[i + 1])
  local s = crc32(f) % n
  local v = redis.call('HGET', KEYS[1], f)
  if v then
    redis.call('HSET', KEYS[s + 2], f, v)
    follow_ttl(deadline, KEYS[s + 2])
    written = written + 1
  else
    removed = removed + redis.call('HDEL', KEYS[s + 2], f)
  end
  if found >= 0 and found ~= s then
    removed = removed + redis.call('HDEL', KEYS[found + 2], f)
  end
end
return {written, removed, now_us() - t0}
