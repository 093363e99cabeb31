-- Old-key-only writes from the shim while the job has a control record (planned, rolled_back),
-- fenced as dual writes are (hash_dual.lua): KEYS[1] the source, KEYS[2] the job's control
-- record; ARGV[1] the op, then its arguments, and last the epoch of the record the call was
-- routed by. A call held up past the runner's next steps (its instance silent for longer than
-- the live window, so the barriers went on without it) would otherwise land on the old key
-- alone beside a running copy: a delete the copy resurrects, a value the shard never gets.
-- Refused, it wrote nothing, and the shim routes it again by the current record.
-- No record at all (removed once the job was finished, say) routes as no job does: old key
-- only, which is what this writes.
local last = #ARGV
local current = redis.call('HGET', KEYS[2], 'epoch')
if current and current ~= ARGV[last] then
  return redis.error_reply('MIGRATORSTALE routed by epoch ' .. ARGV[last] .. ', now ' ..
    tostring(current))
end
last = last - 1
local op, key = ARGV[1], KEYS[1]
if op == 'hset' then
  return call_parts('HSET', key, ARGV, 2, last, 2)
elseif op == 'hdel' then
  return call_parts('HDEL', key, ARGV, 2, last, 1)
elseif op == 'hsetnx' then
  return redis.call('HSETNX', key, ARGV[2], ARGV[3])
elseif op == 'hincrby' then
  -- The value as the server holds it: HINCRBY's reply becomes a Lua number, a double.
  redis.call('HINCRBY', key, ARGV[2], ARGV[3])
  return redis.call('HGET', key, ARGV[2])
elseif op == 'hincrbyfloat' then
  return redis.call('HINCRBYFLOAT', key, ARGV[2], ARGV[3])
end
return redis.error_reply('migrator: unknown old-key op ' .. tostring(op))
