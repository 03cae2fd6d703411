-- Apply one committed change. Only the direct successor of the cached revision is applied;
-- anything else leaves a floor at the new revision so the next reader reloads from PostgreSQL.
-- Then publish ARGV[7] to the ARGV[8] topics that follow it (none: a broker elsewhere): the
-- change's broadcast, when the broker is this server, leaves after the cache holds the change.
-- KEYS[2] holds, for each scope (field ARGV[5]; none if empty: on a Redis Cluster announced.lua
-- records it on its own shard, and only KEYS[1] is given), the highest revision ever
-- announced of it in one database and the task that committed it ("<revision> <task id>"), kept with no expiry; KEYS[3] when each
-- scope was last announced a new revision. A commit at a revision another task committed
-- before means PostgreSQL went back in time (OptionsStore.propagate, worker/duties/reconcile.py).
-- Returns {outcome, the highest revision announced before, the task that committed it}.
local ntopics = tonumber(ARGV[8])
local new = tonumber(ARGV[3])
local announced, by = 0, ''
local entry = ARGV[5] ~= '' and redis.call('HGET', KEYS[2], ARGV[5])
if entry then
  local revision, task = string.match(entry, '^(%d+) ?(.*)$')
  announced, by = tonumber(revision) or 0, task or ''
end
if ARGV[5] ~= '' and announced < new then
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[2], ARGV[5], ARGV[3] .. ' ' .. ARGV[6])
  redis.call('ZADD', KEYS[3], tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[5])
  -- Trimmed by age each round of the reconciler; by count here, should no leader run.
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -10001)
end
local function announce(outcome)
  for t = 9, 8 + ntopics do
    redis.call('PUBLISH', ARGV[t], ARGV[7])
  end
  return {outcome, announced, by}
end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= new then return announce('old') end
if (not cur) or tonumber(cur) ~= new - 1 or redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[2], '1')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return announce('floor')
end
local i = 9 + ntopics
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
