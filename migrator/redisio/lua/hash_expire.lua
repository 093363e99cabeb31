-- The shim's expiry verbs on one logical hash, in one call so that concurrent calls never
-- leave its keys with two deadlines: KEYS are the keys the phase writes (the source and/or
-- every shard), all given the same absolute deadline, or none.
-- ARGV: mode ('in': ARGV[2] ms from now by the server's clock | 'at': ARGV[2] unix ms |
-- 'persist'), then gate ('1': KEYS[1], the old key while it is kept, is the hash: without it
-- the hash does not exist and nothing is touched, and its result is the call's).
-- Keys that do not exist are left alone (as EXPIRE leaves a missing key): nothing is created.
-- Returns {keys given the deadline, keys whose deadline PERSIST removed}; gated, the old
-- key's {1, 1 when PERSIST removed its deadline}.
local mode, gate = ARGV[1], ARGV[3] == '1'
local deadline = nil
if mode == 'in' then
  deadline = math.floor(wall_us() / 1000) + tonumber(ARGV[2])
elseif mode == 'at' then
  deadline = ARGV[2]
elseif mode ~= 'persist' then
  return redis.error_reply('ERR hash_expire: unknown mode ' .. tostring(mode))
end
if gate and redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
-- PEXPIREAT and PERSIST leave a missing key alone and return 0 for it.
local set, persisted, first = 0, 0, 0
for i = 1, #KEYS do
  local changed
  if deadline then
    changed = redis.call('PEXPIREAT', KEYS[i], deadline)
    set = set + changed
  else
    changed = redis.call('PERSIST', KEYS[i])
    persisted = persisted + changed
  end
  if i == 1 then first = changed end
end
if gate then return {1, first} end
return {set, persisted}
