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
        out += jsonSubjectMember(type: item.subjectType, id: item.subjectID)
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
        if let url = item.url {
            out += ",\"url\":"
            out += jsonQuoted(url)
        }
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
    static func timestamp(_ date: Date) -> String { RFC3339.wholeSeconds(date) }
}
