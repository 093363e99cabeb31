-- Remove up to ARGV[2] members of a Hash/Set/ZSet without blocking: one HSCAN/SSCAN/ZSCAN
-- step from cursor ARGV[1], then HDEL/SREM/ZREM of what it returned.
-- KEYS[1] = the key.  ARGV = cursor, count.  Returns {next_cursor, removed, elapsed_us}.
-- Removing members while scanning is safe: SCAN guarantees members present for the whole
-- iteration are returned; deleting never makes it skip the others.
local t0 = now_us()
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return {'0', 0, now_us() - t0} end
local scan_cmd, del_cmd, step = 'HSCAN', 'HDEL', 2
if kind == 'set' then scan_cmd, del_cmd, step = 'SSCAN', 'SREM', 1
elseif kind == 'zset' then scan_cmd, del_cmd, step = 'ZSCAN', 'ZREM', 2 end
local scan = redis.call(scan_cmd, KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local items = scan[2]
local members = {}
for i = 1, #items, step do members[#members + 1] = items[i] end
local removed = 0
if #members > 0 then removed = call_parts(del_cmd, KEYS[1], members, 1, #members, 1) end
return {scan[1], removed, now_us() - t0}
