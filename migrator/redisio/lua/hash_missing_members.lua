-- One verification step, shard → source: which of the named members (scanned from a shard by
-- the runner, and routed to it) the source does not hold. A member the source lacks whose shard
-- value is a TOMBSTONE (a delete made while the copy could run, hash_dual.lua) is not a
-- difference: the mark has done its work, and it is removed here, in the same atomic step that
-- saw the source without the member.
-- KEYS[1] = source, KEYS[2] = the shard.  ARGV = members.
-- Returns {elapsed_us, {member, ...}, marks removed}.
local t0 = now_us()
if #ARGV == 0 then return {now_us() - t0, {}, 0} end
local values = hmget_parts(KEYS[1], ARGV, 1, #ARGV)
local missing, n = {}, 0
local swept = {}
for i = 1, #ARGV do
  if not values[i] then n = n + 1; missing[n] = ARGV[i] end
end
if n > 0 then
  local held = hmget_parts(KEYS[2], missing, 1, n)
  local still, k = {}, 0
  for i = 1, n do
    if held[i] == TOMBSTONE then
      swept[#swept + 1] = missing[i]
    elseif held[i] then
      k = k + 1; still[k] = missing[i]
    end  -- else deleted from both sides since the scan found it: no difference
  end
  if #swept > 0 then call_parts('HDEL', KEYS[2], swept, 1, #swept, 1) end
  missing = still
end
return {now_us() - t0, missing, #swept}
