import Foundation

/// When a recipient's digests go out: a local hour and minute every day (DAILY) or on one
/// weekday (WEEKLY), in the recipient's IANA time zone (issue 11, docs/engine.md).
///
/// Slots are computed from wall-clock time in that zone, so they follow daylight saving time:
/// 08:00 in Paris is 07:00 UTC in winter and 06:00 UTC in summer. Two rules cover the hours a
/// transition breaks:
/// - a slot in a **skipped** hour (spring forward: 02:30 does not exist on that night) moves to
///   the next minute that does exist (03:00, the transition itself);
/// - a slot in a **repeated** hour (fall back: 02:30 happens twice) fires once, at the first
///   02:30; the second is not a slot.
///
/// Every slot is an instant; a digest run is unique per (user, frequency, slot), so the slot
/// is the window's name as well as its end.
public struct DigestSchedule: Sendable, Equatable {
    public enum Cadence: Sendable, Equatable {
        case daily
        /// On this ISO weekday: 1 is Monday, 7 is Sunday.
        case weekly(weekday: Int)
    }

    public var cadence: Cadence
    /// Local time of day, 0–23 and 0–59.
    public var hour: Int
    public var minute: Int
    public var timeZone: TimeZone

    /// `nil` when the hour, minute or weekday is out of range.
    public init?(cadence: Cadence, hour: Int, minute: Int = 0, timeZone: TimeZone) {
        guard (0...23).contains(hour), (0...59).contains(minute) else { return nil }
        if case .weekly(let weekday) = cadence, !(1...7).contains(weekday) { return nil }
        self.cadence = cadence
        self.hour = hour
        self.minute = minute
        self.timeZone = timeZone
    }

    /// The first slot strictly after `instant`.
    public func slot(after instant: Date) -> Date {
        var day = LocalDate(instant, in: timeZone).adding(days: -1)
        // Two weeks covers a weekly cadence from any starting day, with a day to spare.
        for _ in 0..<16 {
            if let slot = slot(on: day), slot > instant { return slot }
            day = day.adding(days: 1)
        }
        preconditionFailure("a daily or weekly slot exists in any 16 consecutive days")
    }

    /// The latest slot at or before `instant`: the one a run due now belongs to.
    public func slot(atOrBefore instant: Date) -> Date {
        var day = LocalDate(instant, in: timeZone).adding(days: 1)
        for _ in 0..<16 {
            if let slot = slot(on: day), slot <= instant { return slot }
            day = day.adding(days: -1)
        }
        preconditionFailure("a daily or weekly slot exists in any 16 consecutive days")
    }

    /// The slot on a local calendar day, or nil when the cadence skips that day.
    func slot(on day: LocalDate) -> Date? {
        if case .weekly(let weekday) = cadence, day.isoWeekday != weekday { return nil }
        return day.instant(hour: hour, minute: minute, in: timeZone)
    }
}

/// A calendar day in some zone, with plain (zone-free) day arithmetic.
struct LocalDate: Sendable, Equatable {
    var year: Int
    var month: Int
    var day: Int

    private static let utc: Calendar = {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = .gmt
        return calendar
    }()

    init(year: Int, month: Int, day: Int) {
        self.year = year
        self.month = month
        self.day = day
    }

    /// The local day of `instant` in `zone`.
    init(_ instant: Date, in zone: TimeZone) {
        let local = instant.addingTimeInterval(TimeInterval(zone.secondsFromGMT(for: instant)))
        let parts = Self.utc.dateComponents([.year, .month, .day], from: local)
        self.init(year: parts.year ?? 1970, month: parts.month ?? 1, day: parts.day ?? 1)
    }

    /// This day's midnight, read as if the wall clock were UTC.
    var midnightUTC: Date {
        Self.utc.date(from: DateComponents(year: year, month: month, day: day)) ?? Date(timeIntervalSince1970: 0)
    }

    func adding(days: Int) -> LocalDate {
        LocalDate(midnightUTC.addingTimeInterval(TimeInterval(days * 86_400)), in: .gmt)
    }

    /// 1 is Monday … 7 is Sunday.
    var isoWeekday: Int {
        let weekday = Self.utc.component(.weekday, from: midnightUTC) // 1 is Sunday
        return (weekday + 5) % 7 + 1
    }

    /// The instant this day's wall time `hour:minute` names in `zone`, by the daylight saving
    /// rules of `DigestSchedule`: a time in a skipped hour moves to the next minute that exists
    /// (the transition), a time in a repeated hour is the first of the two.
    func instant(hour: Int, minute: Int, in zone: TimeZone) -> Date {
        // A gap is at most a few hours; three cover every zone in the database.
        for shift in 0..<(3 * 60) {
            if let instant = firstInstant(minutes: hour * 60 + minute + shift, in: zone) { return instant }
        }
        preconditionFailure("no wall time within three hours of \(hour):\(minute) exists in \(zone.identifier)")
    }

    /// The earliest instant whose wall time in `zone` is this day at `minutes` past midnight
    /// (which may run into the next day); nil when that wall time does not exist.
    private func firstInstant(minutes: Int, in zone: TimeZone) -> Date? {
        instants(minutes: minutes, in: zone).first
    }

    /// Every instant whose wall time in `zone` is this day at `minutes` past midnight, earliest
    /// first: none in a skipped hour, two in a repeated one.
    func instants(minutes: Int, in zone: TimeZone) -> [Date] {
        let wall = midnightUTC.addingTimeInterval(TimeInterval(minutes * 60))
        // The offsets in force around that wall time: before and after any transition near it.
        let offsets = Set([-86_400, 0, 86_400].map { zone.secondsFromGMT(for: wall.addingTimeInterval(TimeInterval($0))) })
        return
            offsets
            .map { wall.addingTimeInterval(TimeInterval(-$0)) }
            .filter { Self.wallSeconds($0, in: zone) == Int(wall.timeIntervalSince1970) }
            .sorted()
    }

    /// Seconds since the epoch of `instant`'s wall clock in `zone`, to compare wall times.
    static func wallSeconds(_ instant: Date, in zone: TimeZone) -> Int {
        Int(instant.timeIntervalSince1970) + zone.secondsFromGMT(for: instant)
    }
}
