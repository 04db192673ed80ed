import Foundation

/// A recurring schedule's rule: the documented subset of RFC 5545 `RRULE` that integrators use
/// for reminders on a rhythm (issue 11), in an IANA time zone.
///
/// Supported parts: `FREQ` (`DAILY`, `WEEKLY`, `MONTHLY`), `INTERVAL`, `BYDAY` (weekdays
/// without ordinals: `MO,WE`), `BYMONTHDAY` (1 to 31, or -1 for the month's last day to -31, as
/// RFC 5545 counts from the end; not with `WEEKLY`), `BYHOUR`, `BYMINUTE`,
/// `COUNT`, `UNTIL` (RFC 3339 or the iCalendar UTC form `20261231T235959Z`; not with `COUNT`).
/// Anything else (`BYSETPOS`, `BYWEEKNO`, ordinals like `1MO`, `WKST`, `SECONDLY`…) is refused
/// by name. Weeks start on Monday.
///
/// Differences from iCalendar, on purpose: `start` is when the schedule begins, not itself an
/// occurrence unless the rule matches it (iCalendar always counts DTSTART); and wall times that
/// daylight saving time skips or repeats follow the digest slots' rules (`DigestSchedule`): a
/// skipped time moves to the next minute that exists, a repeated one happens once, the first.
/// Parts left out default from `start` in the zone: its hour and minute (with `BYHOUR` given,
/// the minute is 0: RFC 5545 would take DTSTART's, but Herald's start defaults to the moment the
/// schedule is saved), its weekday (`WEEKLY`), its day of the month (`MONTHLY`; a month without
/// that day has no occurrence).
public struct Recurrence: Sendable, Equatable {
    public enum Frequency: String, Sendable {
        case daily = "DAILY"
        case weekly = "WEEKLY"
        case monthly = "MONTHLY"
    }

    public var frequency: Frequency
    public var interval: Int
    /// ISO weekdays, 1 is Monday.
    public var weekdays: [Int]
    public var monthDays: [Int]
    public var hours: [Int]
    public var minutes: [Int]
    public var count: Int?
    public var until: Date?
    public var start: Date
    public var timeZone: TimeZone

    /// Why a rule was refused, said so that an integrator can fix it.
    public struct Invalid: Error, Equatable, CustomStringConvertible {
        public var description: String
    }

    /// Parses `FREQ=WEEKLY;INTERVAL=2;BYDAY=MO,WE;BYHOUR=9;BYMINUTE=30;COUNT=10` (an optional
    /// leading `RRULE:` is accepted).
    public init(rule: String, start: Date, timeZone: TimeZone) throws(Invalid) {
        var text = rule.trimmingCharacters(in: .whitespaces)
        if text.uppercased().hasPrefix("RRULE:") { text.removeFirst(6) }
        var parts: [String: String] = [:]
        for part in text.split(separator: ";", omittingEmptySubsequences: true) {
            let pair = part.split(separator: "=", maxSplits: 1).map { String($0).uppercased() }
            guard pair.count == 2, !pair[1].isEmpty else { throw Invalid(description: "'\(part)' is not NAME=VALUE.") }
            guard parts.updateValue(pair[1], forKey: pair[0]) == nil else { throw Invalid(description: "\(pair[0]) is given twice.") }
        }
        let supported: Set = ["FREQ", "INTERVAL", "BYDAY", "BYMONTHDAY", "BYHOUR", "BYMINUTE", "COUNT", "UNTIL"]
        if let unknown = parts.keys.sorted().first(where: { !supported.contains($0) }) {
            throw Invalid(description: "\(unknown) is not supported; a rule may use \(supported.sorted().joined(separator: ", ")).")
        }
        guard let name = parts["FREQ"] else { throw Invalid(description: "FREQ is required (DAILY, WEEKLY or MONTHLY).") }
        guard let frequency = Frequency(rawValue: name) else {
            throw Invalid(description: "FREQ=\(name) is not supported; use DAILY, WEEKLY or MONTHLY.")
        }
        let local = LocalDate(start, in: timeZone)
        let clock = LocalDate.wallSeconds(start, in: timeZone) - Int(local.midnightUTC.timeIntervalSince1970)
        self.frequency = frequency
        self.start = start
        self.timeZone = timeZone
        interval = try Self.numbers(parts["INTERVAL"], "INTERVAL", in: 1...1000).first ?? 1
        weekdays = try Self.weekdays(parts["BYDAY"])
        monthDays = try Self.numbers(parts["BYMONTHDAY"], "BYMONTHDAY", in: -31...31)
        if monthDays.contains(0) {
            throw Invalid(description: "BYMONTHDAY takes 1 to 31, or -1 (the month's last day) to -31; '0' is not one.")
        }
        hours = try Self.numbers(parts["BYHOUR"], "BYHOUR", in: 0...23)
        minutes = try Self.numbers(parts["BYMINUTE"], "BYMINUTE", in: 0...59)
        count = try Self.numbers(parts["COUNT"], "COUNT", in: 1...100_000).first
        until = try parts["UNTIL"].map(Self.instant)
        if frequency == .weekly, !monthDays.isEmpty { throw Invalid(description: "BYMONTHDAY cannot be used with FREQ=WEEKLY.") }
        if count != nil, until != nil { throw Invalid(description: "COUNT and UNTIL cannot both be given.") }
        if parts["INTERVAL"]?.contains(",") == true || parts["COUNT"]?.contains(",") == true {
            throw Invalid(description: "INTERVAL and COUNT take one number.")
        }
        // `BYHOUR=17` alone is 17:00, not 17 and the minute the schedule happened to be saved at
        // (a trial's reminder went at 09:45): the start's minute only goes with the start's hour.
        if minutes.isEmpty { minutes = [hours.isEmpty ? clock % 3600 / 60 : 0] }
        if hours.isEmpty { hours = [clock / 3600] }
        if frequency == .weekly, weekdays.isEmpty { weekdays = [local.isoWeekday] }
        if frequency == .monthly, weekdays.isEmpty, monthDays.isEmpty { monthDays = [local.day] }
    }

    /// Up to `limit` occurrences after `instant` (all of them from the start when nil), in order.
    public func occurrences(after instant: Date? = nil, limit: Int) -> [Date] {
        var found: [Date] = []
        var counted = 0
        var period = 0
        // A rule may match nothing for a long while (BYMONTHDAY=31 every other month), not for
        // ever: 5 000 periods without an occurrence ends the search.
        var idle = 0
        while found.count < limit, idle < 5_000 {
            var matched = false
            for occurrence in occurrences(inPeriod: period) where occurrence >= start {
                if let until, occurrence > until { return found }
                matched = true
                counted += 1
                if let count, counted > count { return found }
                if instant.map({ occurrence > $0 }) ?? true {
                    found.append(occurrence)
                    if found.count == limit { return found }
                }
            }
            idle = matched ? 0 : idle + 1
            period += 1
        }
        return found
    }

    /// The occurrences of the `index`th period (day, week or month) after the one `start` is in.
    private func occurrences(inPeriod index: Int) -> [Date] {
        let first = LocalDate(start, in: timeZone)
        let days: [LocalDate]
        switch frequency {
        case .daily:
            let day = first.adding(days: index * interval)
            days = matches(day) ? [day] : []
        case .weekly:
            let monday = first.adding(days: 1 - first.isoWeekday + 7 * index * interval)
            days = weekdays.sorted().map { monday.adding(days: $0 - 1) }
        case .monthly:
            let month = first.addingMonths(index * interval)
            days = (1...month.daysInMonth).map { LocalDate(year: month.year, month: month.month, day: $0) }.filter(matches)
        }
        let times = hours.sorted().flatMap { hour in minutes.sorted().map { (hour, $0) } }
        // Sorted and without repeats: two wall times can name one instant (a skipped hour).
        return Array(Set(days.flatMap { day in times.map { day.instant(hour: $0.0, minute: $0.1, in: timeZone) } })).sorted()
    }

    /// Whether `day` is one of the rule's: its weekday, and its day of the month counted from
    /// the start (1) or from the end (-1, the last).
    private func matches(_ day: LocalDate) -> Bool {
        (weekdays.isEmpty || weekdays.contains(day.isoWeekday))
            && (monthDays.isEmpty || monthDays.contains(day.day) || monthDays.contains(day.day - day.daysInMonth - 1))
    }

    private static func numbers(_ text: String?, _ name: String, in range: ClosedRange<Int>) throws(Invalid) -> [Int] {
        guard let text else { return [] }
        var values: [Int] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let value = Int(item), range.contains(value) else {
                throw Invalid(description: "\(name) takes numbers from \(range.lowerBound) to \(range.upperBound); '\(item)' is not one.")
            }
            values.append(value)
        }
        return Array(Set(values)).sorted()
    }

    private static func weekdays(_ text: String?) throws(Invalid) -> [Int] {
        guard let text else { return [] }
        let names = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]
        var values: [Int] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let index = names.firstIndex(of: String(item)) else {
                throw Invalid(description: "BYDAY takes MO, TU, WE, TH, FR, SA, SU (no ordinals such as 1MO); '\(item)' is not one.")
            }
            values.append(index + 1)
        }
        return Array(Set(values)).sorted()
    }

    /// `UNTIL`: RFC 3339, or iCalendar's UTC form.
    private static func instant(_ text: String) throws(Invalid) -> Date {
        if let date = RFC3339.date(from: text) { return date }
        let digits = text.filter(\.isNumber)
        if text.count == 16, text.hasSuffix("Z"), text.dropFirst(8).first == "T", digits.count == 14,
            let date = RFC3339.date(
                from:
                    "\(digits.prefix(4))-\(digits.dropFirst(4).prefix(2))-\(digits.dropFirst(6).prefix(2))T\(digits.dropFirst(8).prefix(2)):\(digits.dropFirst(10).prefix(2)):\(digits.dropFirst(12))Z"
            )
        {
            return date
        }
        throw Invalid(description: "UNTIL must be a UTC date-time such as 20261231T235959Z or 2026-12-31T23:59:59Z.")
    }
}

extension LocalDate {
    /// The first day of the month `months` after this day's.
    func addingMonths(_ months: Int) -> LocalDate {
        let index = year * 12 + (month - 1) + months
        return LocalDate(year: index / 12, month: index % 12 + 1, day: 1)
    }

    var daysInMonth: Int {
        let next = addingMonths(1)
        let first = LocalDate(year: year, month: month, day: 1)
        return Int(next.midnightUTC.timeIntervalSince(first.midnightUTC) / 86_400)
    }
}
