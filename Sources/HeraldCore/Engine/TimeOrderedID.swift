import Foundation

/// UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Rows keyed by
/// these insert at the right edge of their index and sort by creation time, which keyset
/// pagination of the feed relies on.
public enum TimeOrderedID {
    public static func make(at date: Date = Date()) -> UUID {
        let millis = UInt64(max(0, date.timeIntervalSince1970 * 1000))
        var generator = SystemRandomNumberGenerator()
        var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
        for i in 0..<6 { bytes[i] = UInt8((millis >> (8 * (5 - UInt64(i)))) & 0xFF) }
        bytes[6] = (bytes[6] & 0x0F) | 0x70 // version 7
        bytes[8] = (bytes[8] & 0x3F) | 0x80 // RFC 4122 variant
        return UUID(
            uuid: (
                bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15]
            ))
    }
}

extension TimeOrderedID {
    /// How long before "mark all read" every notify transaction is assumed finished (a 100 000
    /// recipient fan-out commits in seconds); rows older than this are covered without checking.
    public static let settlingTime: TimeInterval = 15 * 60

    /// The largest UUID v7 of the millisecond of `date`: every row made up to then sorts at or below it.
    public static func upperBound(at date: Date) -> UUID {
        let millis = UInt64(max(0, date.timeIntervalSince1970 * 1000))
        var bytes = [UInt8](repeating: 0xFF, count: 16)
        for i in 0..<6 { bytes[i] = UInt8((millis >> (8 * (5 - UInt64(i)))) & 0xFF) }
        bytes[6] = 0x7F
        bytes[8] = 0xBF
        return UUID(
            uuid: (
                bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15]
            ))
    }
}
