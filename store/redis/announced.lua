-- On a Redis Cluster, the part of delta.lua that records an announcement, run on the shard of
-- the database's record (store/redis/cluster.py) before delta.lua runs on the scope's shard.
-- KEYS[1]: for each scope (field ARGV[1]), the highest revision ever announced of it and the
-- task that committed it ("<revision> <task id>"), no expiry; KEYS[2]: when each scope was last
-- announced a new revision. ARGV[2]: the revision announced now, ARGV[3]: its task.
-- Returns {the highest revision announced before, the task that committed it}.
local new = tonumber(ARGV[2])
local announced, by = 0, ''
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if entry then
  local revision, task = string.match(entry, '^(%d+) ?(.*)$')
  announced, by = tonumber(revision) or 0, task or ''
end
if announced < new then
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
  redis.call('ZADD', KEYS[2], tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[1])
  -- Trimmed by age each round of the reconciler; by count here, should no leader run.
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -10001)
end
return {announced, by}
