-- Copy named members of a Hash source into their shards, atomically: the runner's copy step.
-- The runner scans the source (HSCAN, outside any script) and routes each member with the same
-- crc32 contract; this script re-reads every value from the source, so what it writes is the
-- source's value at this instant, never the possibly older one the scan saw.
-- KEYS[1] = source, KEYS[2..G+1] = the shard of each group.
-- ARGV[1] = budget_us, ARGV[2..G+1] = members in each group, then the members, group by group.
-- Returns {groups_done, elapsed_us}: past budget_us it stops between groups, and the runner
-- sends the groups not done in another script.
--
-- Why this cannot lose or corrupt a write (standalone/sentinel, source and shards on one
-- server): every shim dual write is itself one script that updates the source and then sets
-- the shard to the source's resulting value (hash_dual.lua). Scripts run one at a time, so
-- after every script `shard[f] == source[f]` for every f the shard holds, and this script keeps
-- that true:
--   * no newer value is overwritten: a later dual write comes after, an earlier one is already
--     in the source value read here;
--   * no deleted member is resurrected: a member deleted since the scan has no source value
--     here, and it is removed from its shard instead of written;
--   * no increment is applied twice: absolute values are written, never deltas.
-- HSCAN returns every member present for the whole scan at least once; members added during
-- the scan are placed in their shard by the dual write that added them.
-- The clock is read every CHECK_EVERY members, not after every group: a small script (the
-- copy's usual one) reads it only at its start and end.
local CHECK_EVERY = 32
local t0 = now_us()
local budget = tonumber(ARGV[1])
local groups = #KEYS - 1
local first = groups + 2
local values = redis.call('HMGET', KEYS[1], unpack(ARGV, first))
local deadline = deadline_ms(KEYS[1])
local pos, check = 0, CHECK_EVERY
for k = 1, groups do
  local n = tonumber(ARGV[k + 1])
  local set, ns, gone, ng = {}, 0, nil, 0
  for j = pos + 1, pos + n do
    local v = values[j]
    if v then
      set[ns + 1] = ARGV[first + j - 1]
      set[ns + 2] = v
      ns = ns + 2
    else
      gone = gone or {}
      ng = ng + 1
      gone[ng] = ARGV[first + j - 1]
    end
  end
  local shard = KEYS[k + 1]
  if ns > 0 then
    redis.call('HSET', shard, unpack(set))
    follow_ttl(deadline, shard)
  end
  if ng > 0 then redis.call('HDEL', shard, unpack(gone)) end
  pos = pos + n
  if k < groups and pos >= check then
    local spent = now_us() - t0
    if spent > budget then return {k, spent} end
    check = pos + CHECK_EVERY
  end
end
return {groups, now_us() - t0}
