-- One verification step, shard → source: which of the named members (scanned from a shard by
-- the runner, and routed to it) the source does not hold. Read-only.
-- KEYS[1] = source.  ARGV = members.  Returns {elapsed_us, {member, ...}}.
local t0 = now_us()
if #ARGV == 0 then return {now_us() - t0, {}} end
local values = redis.call('HMGET', KEYS[1], unpack(ARGV))
local missing, n = {}, 0
for i = 1, #ARGV do
  if not values[i] then n = n + 1; missing[n] = ARGV[i] end
end
return {now_us() - t0, missing}
