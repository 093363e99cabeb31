-- Make each shard's (KEYS[2..]) absolute deadline the source's (KEYS[1]): PEXPIREAT where the
-- source has one the shard lacks or differs from, PERSIST where the source has none and the
-- shard has one. The copy's inserts (HSETNX) create shards without a deadline, and an
-- application may set, move or drop the source's deadline (EXPIRE, PERSIST) at any time.
-- Returns how many shards changed.
local deadline = deadline_ms(KEYS[1])
local n = 0
for i = 2, #KEYS do
  n = n + follow_ttl(deadline, KEYS[i])
end
return n
