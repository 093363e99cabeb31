-- Re-check named members (later verification rounds): which still differ, and how.
-- KEYS[1] = source, then the shard keys the members name (only those, as hash_sync.lua).
-- ARGV = member, its shard's KEYS index, the KEYS index of the shard it was found in (0:
-- none), ...
-- Returns {elapsed_us, {member, kind, KEYS index of the shard, ...}} for the members that
-- still differ.
local t0 = now_us()
local diffs = {}
for i = 1, #ARGV, 3 do
  local f = ARGV[i]
  local s = tonumber(ARGV[i + 1])
  local found = tonumber(ARGV[i + 2])
  local ov = redis.call('HGET', KEYS[1], f)
  local sv = redis.call('HGET', KEYS[s], f)
  local kind = nil
  if ov and not sv then kind = 'missing_in_shard'
  elseif sv and not ov then kind = 'extra_in_shard'
  elseif ov and sv and ov ~= sv then kind = 'value_differs' end
  if kind then diffs[#diffs + 1] = f; diffs[#diffs + 1] = kind; diffs[#diffs + 1] = s end
  if found > 0 and found ~= s and redis.call('HEXISTS', KEYS[found], f) == 1 then
    diffs[#diffs + 1] = f; diffs[#diffs + 1] = 'extra_in_shard'; diffs[#diffs + 1] = found
  end
end
return {now_us() - t0, diffs}
