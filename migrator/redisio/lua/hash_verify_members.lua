-- One verification step, source → shards, for members the runner scanned and routed: each
-- must be in its shard with the source's value. Read-only and atomic: a dual write is never
-- seen half-done, so what this reports differed at one instant.
-- KEYS[1] = source, KEYS[2..G+1] = the shard of each group.
-- ARGV[1..G] = members in each group, then the members, group by group.
-- Returns {elapsed_us, {member, kind, group, ...}} (group: 1-based index into the groups).
local t0 = now_us()
local groups = #KEYS - 1
local first = groups + 1
local source = hmget_parts(KEYS[1], ARGV, first, #ARGV)
local diffs, nd = {}, 0
local pos = 0
for k = 1, groups do
  local n = tonumber(ARGV[k])
  local shard = hmget_parts(KEYS[k + 1], ARGV, first + pos, first + pos + n - 1)
  for j = 1, n do
    local ov, sv = source[pos + j], shard[j]
    local kind = nil
    if ov and not sv then kind = 'missing_in_shard'
    elseif sv and not ov then kind = 'extra_in_shard'
    elseif ov and sv and ov ~= sv then kind = 'value_differs' end
    if kind then
      diffs[nd + 1] = ARGV[first + pos + j - 1]; diffs[nd + 2] = kind; diffs[nd + 3] = k
      nd = nd + 3
    end
  end
  pos = pos + n
end
return {now_us() - t0, diffs}
