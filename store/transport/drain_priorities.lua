-- A producer that set a priority pushed to a per-priority list this consumer does not wait
-- on: move such messages to the queue's own list, in order, so they run.
-- KEYS: the per-priority lists. ARGV[1]: the queue.
local moved = 0
for _, key in ipairs(KEYS) do
    while redis.call('LMOVE', key, ARGV[1], 'RIGHT', 'LEFT') do
        moved = moved + 1
    end
end
return moved
