-- The shim's expiry verbs on one logical hash: KEYS are some of its keys (the source and/or
-- shards, as the phase writes them), all given the same absolute deadline, or none.
-- ARGV: 'in', ms from now by the server's clock | 'at', unix ms | 'persist'.
-- Keys that do not exist are left alone (as EXPIRE leaves a missing key). Returns
-- {keys that exist, keys whose deadline PERSIST removed, the absolute deadline or -1}: a
-- caller with more keys than one call takes sends the rest 'at' that deadline.
local mode = ARGV[1]
local deadline = nil
if mode == 'in' then
  deadline = math.floor(wall_us() / 1000) + tonumber(ARGV[2])
elseif mode == 'at' then
  deadline = tonumber(ARGV[2])
elseif mode ~= 'persist' then
  return redis.error_reply('ERR hash_expire: unknown mode ' .. tostring(mode))
end
local existing, persisted = 0, 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    existing = existing + 1
    if deadline then
      redis.call('PEXPIREAT', KEYS[i], deadline)
    else
      persisted = persisted + redis.call('PERSIST', KEYS[i])
    end
  end
end
return {existing, persisted, deadline or -1}
