-- Turn a cached scope that is behind ARGV[3] into a floor at ARGV[3] (no values, stale mark):
-- readers then load PostgreSQL and refill. An absent hash is left absent, a current one alone.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (not cur) or tonumber(cur) >= tonumber(ARGV[3]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[2], '1')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
