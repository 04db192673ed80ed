import Foundation

/// UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Rows keyed by
/// these insert at the right edge of their index and sort by creation time, which keyset
/// pagination of the feed relies on.
public enum TimeOrderedID {
    public static func make(at date: Date = Date()) -> UUID {
        // Two draws of the system generator (a getrandom call each on Linux), not one per byte:
        // a fan-out makes one or more of these per recipient.
        var generator = SystemRandomNumberGenerator()
        let high = millis(of: date) << 16 | 0x7000 | (generator.next() & 0x0FFF) // version 7
        let low = generator.next() & 0x3FFF_FFFF_FFFF_FFFF | 0x8000_0000_0000_0000 // RFC 4122 variant
        return uuid(high: high, low: low)
    }

    static func millis(of date: Date) -> UInt64 {
        UInt64(max(0, date.timeIntervalSince1970 * 1000))
    }

    static func uuid(high: UInt64, low: UInt64) -> UUID {
        withUnsafeBytes(of: (high.bigEndian, low.bigEndian)) { UUID(uuid: $0.load(as: uuid_t.self)) }
    }
}

extension TimeOrderedID {
    /// How long before "mark all read" every notify transaction is assumed finished (a 100 000
    /// recipient fan-out commits in seconds); rows older than this are covered without checking.
    public static let settlingTime: TimeInterval = 15 * 60

    /// The largest UUID v7 of the millisecond of `date`: every row made up to then sorts at or below it.
    public static func upperBound(at date: Date) -> UUID {
        uuid(high: millis(of: date) << 16 | 0x7FFF, low: 0xBFFF_FFFF_FFFF_FFFF)
    }
}
