-- One verification step, source → shards: every scanned source member must be in its shard
-- with an equal value. Read-only and atomic, so a dual write can never be seen half-done.
-- KEYS[1] = source, KEYS[2..N+1] = shards.  ARGV = cursor, count.
-- Returns {next_cursor, members_checked, elapsed_us, {member, kind, shard, ...}}.
local t0 = now_us()
local scan = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local items = scan[2]
local n = #KEYS - 1
local diffs = {}
for i = 1, #items, 2 do
  local f = items[i]
  local s = crc32(f) % n
  local v = redis.call('HGET', KEYS[s + 2], f)
  if not v then
    diffs[#diffs + 1] = f; diffs[#diffs + 1] = 'missing_in_shard'; diffs[#diffs + 1] = s
  elseif v ~= items[i + 1] then
    diffs[#diffs + 1] = f; diffs[#diffs + 1] = 'value_differs'; diffs[#diffs + 1] = s
  end
end
return {scan[1], #items / 2, now_us() - t0, diffs}
