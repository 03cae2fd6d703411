-- Gives back what a consumer took: everything its taken list holds goes to the end of the queue
-- that is read next, oldest last in, so the oldest runs first; then the consumer leaves the
-- registry, unless its entry changed since the caller read it (then it registered again: it is
-- alive and keeps its entry). Run by a consumer closing cleanly, and by the sweep for one that
-- is gone.
-- KEYS[1]: its taken list, KEYS[2]: the registry.
-- ARGV[1]: the queue, ARGV[2]: its token, ARGV[3]: its entry as the caller read it.
local moved = 0
while redis.call('LMOVE', KEYS[1], ARGV[1], 'LEFT', 'RIGHT') do
    moved = moved + 1
end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then
    redis.call('HDEL', KEYS[2], ARGV[2])
end
return moved
