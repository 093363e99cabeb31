-- One copy step of a Hash source, atomic on the server.
-- KEYS[1] = source, KEYS[2..N+1] = shard 0..N-1.  ARGV = cursor, count, budget_us.
-- Returns {next_cursor, members_scanned, elapsed_us, leftover_fields}.
--
-- Why this cannot lose or corrupt a write (standalone/sentinel, where source and shards share
-- one server): the values written here are read by HSCAN inside the same script, so they are
-- the source's values at this instant; every shim dual write is itself one script that updates
-- the source and then sets the shard to the source's resulting value (hash_dual.lua). Scripts
-- run one at a time, so after every script `shard[f] == source[f]` for every f the shard holds:
--   * no newer value is overwritten: a later dual write comes after, an earlier one is already
--     in the source value we copy;
--   * no deleted member is resurrected: a member HDEL'd from the source is not returned by the
--     HSCAN of a later step, and one deleted earlier is not in the source at all;
--   * no increment is applied twice: the copy writes absolute values, never deltas.
-- HSCAN returns every member present for the whole scan at least once; members added during
-- the scan are placed in their shard by the dual write that added them.
-- If the writes run past budget_us, the fields not yet written are returned as leftovers; the
-- runner copies them with hash_sync.lua, which re-reads each value, so nothing is lost.
local t0 = now_us()
local budget = tonumber(ARGV[3])
local scan = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local items = scan[2]
local n = #KEYS - 1
local groups, order = {}, {}
for i = 1, #items, 2 do
  local s = crc32(items[i]) % n + 2
  local g = groups[s]
  if not g then g = {}; groups[s] = g; order[#order + 1] = s end
  g[#g + 1] = items[i]
  g[#g + 1] = items[i + 1]
end
local deadline = deadline_ms(KEYS[1])
local leftovers = {}
local over = false
for _, s in ipairs(order) do
  local g = groups[s]
  if over then
    for j = 1, #g, 2 do leftovers[#leftovers + 1] = g[j] end
  else
    redis.call('HSET', KEYS[s], unpack(g))
    follow_ttl(deadline, KEYS[s])
    if now_us() - t0 > budget then over = true end
  end
end
return {scan[1], #items / 2, now_us() - t0, leftovers}
