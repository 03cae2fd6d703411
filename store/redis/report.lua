-- A process's report, in one command: the revisions it forgot deleted, its fields set, the
-- expiry refreshed (store/redis/presence.py:Presence.report).
-- KEYS[1]: the report's hash
-- ARGV[1]: its time to live in milliseconds; ARGV[2]: n, the number of fields to delete
-- ARGV[3 .. 2+n]: those fields; then field, value pairs to set
-- Returns how many of the fields set were new (HSET's answer). Arguments go to HDEL and HSET in
-- slices: unpack() of a whole report (up to 5,000 revisions) would overflow Lua's stack.
local key = KEYS[1]
local SLICE = 1000 -- even: a slice of pairs ends on a pair
local first_set = 3 + tonumber(ARGV[2])
for i = 3, first_set - 1, SLICE do
  redis.call('HDEL', key, unpack(ARGV, i, math.min(i + SLICE - 1, first_set - 1)))
end
local added = 0
for i = first_set, #ARGV, SLICE do
  added = added + redis.call('HSET', key, unpack(ARGV, i, math.min(i + SLICE - 1, #ARGV)))
end
redis.call('PEXPIRE', key, ARGV[1])
return added
