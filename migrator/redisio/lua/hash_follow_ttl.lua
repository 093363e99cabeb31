-- Give each shard (KEYS[2..]) the source's (KEYS[1]) absolute deadline, where the source has
-- one and the shard exists without one: the copy's inserts (HSETNX) create shards without it.
-- Returns how many shards got it.
local deadline = deadline_ms(KEYS[1])
if not deadline then return 0 end
local n = 0
for i = 2, #KEYS do
  if redis.call('PTTL', KEYS[i]) == -1 then
    redis.call('PEXPIREAT', KEYS[i], deadline)
    n = n + 1
  end
end
return n
