-- Apply one committed change. Only the direct successor of the cached revision is applied;
-- anything else leaves a floor at the new revision so the next reader reloads from PostgreSQL.
-- Then publish ARGV[5] to the ARGV[6] topics that follow it (none: a broker elsewhere): the
-- change's broadcast, when the broker is this server, leaves after the cache holds the change.
local ntopics = tonumber(ARGV[6])
local function announce(outcome)
  for t = 7, 6 + ntopics do
    redis.call('PUBLISH', ARGV[t], ARGV[5])
  end
  return outcome
end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local new = tonumber(ARGV[3])
if cur and tonumber(cur) >= new then return announce('old') end
if (not cur) or tonumber(cur) ~= new - 1 or redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[2], '1')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return announce('floor')
end
local i = 7 + ntopics
local nsets = tonumber(ARGV[i])
i = i + 1
for _ = 1, nsets do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  i = i + 1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return announce('applied')
