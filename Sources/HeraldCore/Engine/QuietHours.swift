import Foundation

/// A recipient's quiet hours: a daily window of local time, in their time zone, during which
/// Herald sends them no email unless it is critical. An email that falls inside the window is
/// held (its delivery is due when the window ends); the in-app row appears at once, as the bell
/// makes no sound. A window may cross midnight (22:00–07:00).
public struct QuietHours: Sendable, Equatable, Hashable {
    /// Minutes after local midnight, 0–1439: the window starts at `start` and ends at `end`.
    public var start: Int
    public var end: Int

    /// `nil` when either time is out of range or the two are equal (a window of no length, or of
    /// the whole day, is not quiet hours).
    public init?(start: Int, end: Int) {
        guard (0..<1440).contains(start), (0..<1440).contains(end), start != end else { return nil }
        self.start = start
        self.end = end
    }

    /// From two "HH:MM" times (24-hour clock).
    public init?(start: String, end: String) {
        guard let from = Self.minutes(start), let to = Self.minutes(end) else { return nil }
        self.init(start: from, end: to)
    }

    /// "HH:MM" as minutes after midnight; nil unless it is exactly two digits, a colon and two
    /// digits, 00:00 to 23:59.
    public static func minutes(_ text: String) -> Int? {
        let bytes = Array(text.utf8)
        guard bytes.count == 5, bytes[2] == UInt8(ascii: ":") else { return nil }
        let digits = [bytes[0], bytes[1], bytes[3], bytes[4]]
        guard digits.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }) else { return nil }
        let value = digits.map { Int($0 - UInt8(ascii: "0")) }
        let hour = value[0] * 10 + value[1]
        let minute = value[2] * 10 + value[3]
        guard hour < 24, minute < 60 else { return nil }
        return hour * 60 + minute
    }

    /// Minutes after midnight as "HH:MM".
    public static func text(_ minutes: Int) -> String {
        let hour = minutes / 60
        let minute = minutes % 60
        return (hour < 10 ? "0" : "") + String(hour) + ":" + (minute < 10 ? "0" : "") + String(minute)
    }

    public var startText: String { Self.text(start) }
    public var endText: String { Self.text(end) }

    /// Whether `instant` falls inside the window, read on the wall clock of `timeZone` (in a
    /// repeated hour, the wall clock says the same time twice).
    public func contains(_ instant: Date, in timeZone: TimeZone) -> Bool {
        let minute = (Int(floor(Double(LocalDate.wallSeconds(instant, in: timeZone)) / 60)) % 1440 + 1440) % 1440
        return start < end ? (start..<end).contains(minute) : (minute >= start || minute < end)
    }

    /// When an email due at `instant` may go: the window's end (the first instant after
    /// `instant` whose local wall time is `end`) when `instant` is inside the window, nil when it
    /// is not. An end in a skipped hour moves to the transition, as a digest slot does; an end in
    /// a repeated hour is whichever of its two instants comes first after `instant` (an email
    /// at the second 02:10 of the night the clocks go back waits for the second 02:30, not for
    /// the next night's).
    public func heldUntil(_ instant: Date, in timeZone: TimeZone) -> Date? {
        guard contains(instant, in: timeZone) else { return nil }
        var day = LocalDate(instant, in: timeZone)
        // The end comes within a day of any instant inside the window; three days cover a
        // transition on either side.
        for _ in 0..<3 {
            let ends = day.instants(minutes: end, in: timeZone)
            let candidates = ends.isEmpty ? [day.instant(hour: end / 60, minute: end % 60, in: timeZone)] : ends
            if let next = candidates.filter({ $0 > instant }).min() { return next }
            day = day.adding(days: 1)
        }
        preconditionFailure("a window's end comes within three days")
    }
}

extension QuietHours {
    /// The window as the database stores it (two nullable columns): nil when either is.
    public static func stored(start: Int?, end: Int?) -> QuietHours? {
        guard let start, let end else { return nil }
        return QuietHours(start: start, end: end)
    }
}
