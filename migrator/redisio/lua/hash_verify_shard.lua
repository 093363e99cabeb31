-- One verification step, shard → source: every member of shard `index` must route to that
-- shard and exist in the source. Values of members present in both are compared by the forward
-- pass (hash_verify.lua); reporting them here too would store one difference twice.
-- KEYS[1] = source, KEYS[2] = this shard.  ARGV = cursor, count, index, shards.
-- Returns {next_cursor, members_checked, elapsed_us, {member, kind, shard, ...}}.
local t0 = now_us()
local scan = redis.call('HSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
local items = scan[2]
local index, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local diffs = {}
for i = 1, #items, 2 do
  local f = items[i]
  local kind = nil
  if crc32(f) % n ~= index then
    kind = 'extra_in_shard'
  else
    if redis.call('HEXISTS', KEYS[1], f) == 0 then kind = 'extra_in_shard' end
  end
  if kind then diffs[#diffs + 1] = f; diffs[#diffs + 1] = kind; diffs[#diffs + 1] = index end
end
return {scan[1], #items / 2, now_us() - t0, diffs}
