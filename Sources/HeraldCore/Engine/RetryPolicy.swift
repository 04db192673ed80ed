import Foundation

/// When to try a failed delivery again: exponential backoff with full jitter on a share of the
/// delay, capped, honouring a receiver's `Retry-After`; nil once the attempts are spent (DEAD).
public struct RetryPolicy: Sendable, Equatable {
    public var baseDelay: TimeInterval
    public var factor: Double
    public var maximumDelay: TimeInterval
    public var maximumAttempts: Int
    /// Share of the delay that is randomised (0 = none, 1 = all of it).
    public var jitter: Double

    public init(
        baseDelay: TimeInterval = 10, factor: Double = 2, maximumDelay: TimeInterval = 3600, maximumAttempts: Int = 8, jitter: Double = 0.2
    ) {
        self.baseDelay = baseDelay
        self.factor = factor
        self.maximumDelay = maximumDelay
        self.maximumAttempts = maximumAttempts
        self.jitter = jitter
    }

    /// The delay before attempt `attempt + 1`, without jitter.
    public func delay(after attempt: Int) -> TimeInterval {
        min(maximumDelay, baseDelay * pow(factor, Double(max(0, attempt - 1))))
    }

    /// When attempt `attempt + 1` may start, or nil when `attempt` was the last one.
    /// `random` is in 0..<1 (injected so tests are exact).
    public func nextAttempt(after attempt: Int, failedAt now: Date, retryAfter: TimeInterval? = nil, random: Double) -> Date? {
        guard attempt < maximumAttempts else { return nil }
        let base = delay(after: attempt)
        let jittered = base * (1 - jitter) + base * jitter * random
        return now.addingTimeInterval(max(jittered, min(retryAfter ?? 0, maximumDelay)))
    }
}
