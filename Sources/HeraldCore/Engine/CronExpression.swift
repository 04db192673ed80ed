import Foundation

/// A job's schedule (issue 11): a five-field cron expression in an IANA time zone, or a fixed
/// interval.
public enum JobSchedule: Sendable, Equatable {
    case cron(CronExpression, TimeZone)
    case every(seconds: Int)

    /// The first run strictly after `instant`.
    public func next(after instant: Date) -> Date {
        switch self {
        case .cron(let expression, let zone): expression.next(after: instant, in: zone)
        case .every(let seconds): instant.addingTimeInterval(TimeInterval(seconds))
        }
    }
}

/// A five-field cron expression, `minute hour day-of-month month day-of-week`, as crontab(5)
/// reads it: `*`, numbers, ranges `a-b`, lists `a,b`, steps `*/n` and `a-b/n`; day of week 0–7
/// (0 and 7 are Sunday). When both day fields are restricted, a day matching either one
/// matches (crontab's rule). Names (`MON`, `JAN`) and `@daily` shorthands are not read.
///
/// Times are wall-clock times in the job's zone and follow the digest slots' daylight saving
/// rules (`DigestSchedule`): a time in a skipped hour runs at the next minute that exists, a
/// time in a repeated hour runs once, the first time.
public struct CronExpression: Sendable, Equatable, CustomStringConvertible {
    public let minutes: Set<Int>
    public let hours: Set<Int>
    public let monthDays: Set<Int>
    public let months: Set<Int>
    /// ISO weekdays, 1 is Monday … 7 is Sunday.
    public let weekdays: Set<Int>
    let monthDaysRestricted: Bool
    let weekdaysRestricted: Bool
    public let description: String

    /// Why an expression was refused, said so an operator can fix it.
    public struct Invalid: Error, Equatable, CustomStringConvertible {
        public let description: String
    }

    public init(_ text: String) throws(Invalid) {
        let fields = text.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard fields.count == 5 else {
            throw Invalid(
                description: "a cron expression has five fields (minute hour day-of-month month day-of-week); got \(fields.count)")
        }
        minutes = try Self.field(fields[0], "minute", 0...59)
        hours = try Self.field(fields[1], "hour", 0...23)
        monthDays = try Self.field(fields[2], "day of month", 1...31)
        months = try Self.field(fields[3], "month", 1...12)
        weekdays = Set(try Self.field(fields[4], "day of week", 0...7).map { $0 == 0 ? 7 : $0 })
        monthDaysRestricted = fields[2] != "*"
        weekdaysRestricted = fields[4] != "*"
        description = fields.joined(separator: " ")
    }

    /// The first time strictly after `instant` that the expression names in `zone`; within
    /// about eight years (a 29 February on a Monday, the rarest, comes within 28), else distant
    /// future.
    public func next(after instant: Date, in zone: TimeZone) -> Date {
        var day = LocalDate(instant, in: zone).adding(days: -1)
        let times = hours.sorted().flatMap { hour in minutes.sorted().map { (hour, $0) } }
        for _ in 0..<(366 * 28) {
            if matches(day) {
                for (hour, minute) in times {
                    let candidate = day.instant(hour: hour, minute: minute, in: zone)
                    if candidate > instant { return candidate }
                }
            }
            day = day.adding(days: 1)
        }
        return .distantFuture
    }

    func matches(_ day: LocalDate) -> Bool {
        guard months.contains(day.month) else { return false }
        let byMonthDay = monthDays.contains(day.day)
        let byWeekday = weekdays.contains(day.isoWeekday)
        switch (monthDaysRestricted, weekdaysRestricted) {
        case (true, true): return byMonthDay || byWeekday
        case (true, false): return byMonthDay
        case (false, true): return byWeekday
        case (false, false): return true
        }
    }

    private static func field(_ text: String, _ name: String, _ range: ClosedRange<Int>) throws(Invalid) -> Set<Int> {
        var values = Set<Int>()
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let pieces = part.split(separator: "/", omittingEmptySubsequences: false)
            guard pieces.count <= 2 else { throw Invalid(description: "\(name): '\(part)' has more than one step") }
            var step = 1
            if pieces.count == 2 {
                guard let n = Int(pieces[1]), n >= 1 else {
                    throw Invalid(description: "\(name): step '\(pieces[1])' is not a positive number")
                }
                step = n
            }
            let bounds: ClosedRange<Int>
            if pieces[0] == "*" {
                bounds = range
            } else {
                let ends = pieces[0].split(separator: "-", omittingEmptySubsequences: false)
                guard (1...2).contains(ends.count), let low = Int(ends[0]), let high = Int(ends.last ?? ""), range.contains(low),
                    range.contains(high), low <= high
                else {
                    throw Invalid(
                        description: "\(name): '\(pieces[0])' is not *, a number or a range within \(range.lowerBound)-\(range.upperBound)")
                }
                // `a/n` reads as `a-max/n`, as cronie reads it.
                bounds = low...(ends.count == 1 && pieces.count == 2 ? range.upperBound : high)
            }
            values.formUnion(stride(from: bounds.lowerBound, through: bounds.upperBound, by: step))
        }
        return values
    }
}
