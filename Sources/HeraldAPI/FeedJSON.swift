import Foundation
import HeraldCore
import HeraldStore

/// The JSON of a feed item, a first page and an unread count, written by hand: `JSONEncoder` was
/// half of a stream's work in a fan-out (`perf`, issue 10's benchmark) and 14 % of the server's
/// CPU on a first page read from the database (issue 12). Streams write the items and counts they
/// push; the bell's reads (`BellReads`) write their answers. The bytes are the encoder's (sorted
/// keys, unescaped slashes, RFC 3339 dates without fractions), which `FeedJSONTests` checks item
/// by item against `FeedStreamSession.json` and against the generated types' encoding.
enum FeedJSON {
    /// A `FeedPage`: the items and the cursor after them.
    static func feedPage(_ items: [FeedItem], next: String?) -> String {
        var out = "{\"items\":["
        out.reserveCapacity(64 + items.count * 400)
        for (index, item) in items.enumerated() {
            if index > 0 { out += "," }
            out += feedItem(item)
        }
        out += "]"
        if let next {
            out += ",\"next_cursor\":"
            out += jsonQuoted(next)
        }
        out += "}"
        return out
    }

    static func feedItem(_ item: FeedItem) -> String {
        var out = "{\"archived\":"
        out.reserveCapacity(256 + item.title.utf8.count + item.body.utf8.count)
        out += item.archived ? "true" : "false"
        out += ",\"body\":"
        out += jsonQuoted(item.body)
        out += ",\"category\":"
        out += jsonQuoted(item.categoryKey)
        out += ",\"created_at\":\""
        out += timestamp(item.createdAt)
        out += "\",\"event_id\":\""
        out += item.eventID.lowercased
        out += "\""
        if let expires = item.expiresAt {
            out += ",\"expires_at\":\""
            out += timestamp(expires)
            out += "\""
        }
        out += ",\"id\":\""
        out += item.id.lowercased
        out += "\",\"priority\":"
        out += jsonQuoted(item.priority.rawValue)
        out += ",\"read\":"
        out += item.read ? "true" : "false"
        out += ",\"severity\":"
        out += jsonQuoted(item.severity.rawValue)
        if let type = item.subjectType {
            out += ",\"subject\":{\"id\":"
            out += jsonQuoted(item.subjectID ?? "")
            out += ",\"type\":"
            out += jsonQuoted(type)
            out += "}"
        }
        if !item.tags.isEmpty {
            out += ",\"tags\":["
            for (index, tag) in item.tags.enumerated() {
                if index > 0 { out += "," }
                out += jsonQuoted(tag)
            }
            out += "]"
        }
        out += ",\"title\":"
        out += jsonQuoted(item.title)
        out += ",\"type\":"
        out += jsonQuoted(item.typeKey)
        out += "}"
        return out
    }

    static func unreadCount(_ count: UnreadCount) -> String {
        var out = "{\"by_category\":{"
        for (index, key) in count.byCategory.keys.sorted().enumerated() {
            if index > 0 { out += "," }
            out += jsonQuoted(key)
            out += ":\(count.byCategory[key] ?? 0)"
        }
        out += "},\"total\":\(count.total)}"
        return out
    }

    /// `2026-11-21T10:00:00Z`: whole seconds (the fraction dropped), UTC.
    static func timestamp(_ date: Date) -> String {
        let seconds = Int((date.timeIntervalSince1970).rounded(.down))
        let (days, secondOfDay) = seconds.quotientAndRemainder(dividingBy: 86_400)
        let day = secondOfDay < 0 ? days - 1 : days
        let second = secondOfDay < 0 ? secondOfDay + 86_400 : secondOfDay
        // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's civil_from_days).
        let z = day + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let monthIndex = (5 * dayOfYear + 2) / 153
        let dayOfMonth = dayOfYear - (153 * monthIndex + 2) / 5 + 1
        let month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        func two(_ value: Int) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let yearText = year < 1000 ? String(repeating: "0", count: 4 - String(year).count) + String(year) : String(year)
        return "\(yearText)-\(two(month))-\(two(dayOfMonth))T\(two(second / 3600)):\(two(second % 3600 / 60)):\(two(second % 60))Z"
    }
}
