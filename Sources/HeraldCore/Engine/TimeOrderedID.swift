import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Rows keyed by
/// these insert at the right edge of their index and sort by creation time, which keyset
/// pagination of the feed relies on.
public enum TimeOrderedID {
    public static func make(at date: Date = Date()) -> UUID {
        let (first, second) = RandomPool.shared.next()
        let high = millis(of: date) << 16 | 0x7000 | (first & 0x0FFF) // version 7
        let low = second & 0x3FFF_FFFF_FFFF_FFFF | 0x8000_0000_0000_0000 // RFC 4122 variant
        return uuid(high: high, low: low)
    }

    /// The system's random bytes, drawn 4 KiB at a time: a fan-out makes two or three ids per
    /// recipient, and a `getrandom` call for each 8 bytes was 3 % of its planning's CPU (issue
    /// 12). The same generator (`SystemRandomNumberGenerator`), in bulk; each value used once.
    final class RandomPool: Sendable {
        static let shared = RandomPool()
        private static let words = 512
        private let state = Mutex<(words: [UInt64], used: Int)>(([], 0))

        /// `words` values in one read of `/dev/urandom` (the kernel's generator, which
        /// `SystemRandomNumberGenerator` reads with one `getrandom` call per value); the
        /// generator itself where that read is not possible or falls short.
        static func draw() -> [UInt64] {
            var words = [UInt64](repeating: 0, count: Self.words)
            #if canImport(Glibc)
                let source = open("/dev/urandom", O_RDONLY | O_CLOEXEC)
                if source >= 0 {
                    defer { close(source) }
                    let filled = words.withUnsafeMutableBytes { buffer in read(source, buffer.baseAddress, buffer.count) }
                    if filled == words.count * MemoryLayout<UInt64>.size { return words }
                }
            #endif
            var generator = SystemRandomNumberGenerator()
            for index in words.indices { words[index] = generator.next() }
            return words
        }

        func next() -> (UInt64, UInt64) {
            state.withLock { state in
                if state.used + 2 > state.words.count {
                    state.words = Self.draw()
                    state.used = 0
                }
                defer { state.used += 2 }
                return (state.words[state.used], state.words[state.used + 1])
            }
        }
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

    /// The smallest UUID v7 of the millisecond of `date`: every row made from then on sorts at or above it.
    public static func lowerBound(at date: Date) -> UUID {
        uuid(high: millis(of: date) << 16 | 0x7000, low: 0x8000_0000_0000_0000)
    }
}
