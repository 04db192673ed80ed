import Foundation
import HeraldCore
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// The hand-written JSON of stream events and of the bell's reads must be the encoder's bytes,
/// field for field: a client reads the same item from the stream and from `GET
/// /v1/me/notifications`, whichever path answered it.
@Suite("Hand-written feed JSON is the encoder's JSON")
struct FeedJSONTests {
    func encoded(_ item: FeedItem) throws -> String {
        try FeedStreamSession.json(Components.Schemas.FeedItem(item))
    }

    func item(
        title: String = "Critical ISQ 25", body: String = "Implant stability 25 is below 55.", subject: (String, String?)? = nil,
        tags: [String] = [], createdAt: Date = Date(timeIntervalSince1970: 1_795_255_200), expiresAt: Date? = nil, read: Bool = false,
        url: String? = nil
    ) -> FeedItem {
        FeedItem(
            id: UUID(), eventID: UUID(), typeKey: "ISQ_CRITICAL", categoryKey: "alerts", severity: .critical, priority: .high,
            title: title, body: body, subjectType: subject?.0, subjectID: subject?.1, read: read, archived: !read, createdAt: createdAt,
            expiresAt: expiresAt, tags: tags, url: url)
    }

    @Test("feed items: every optional field present or absent, awkward characters, odd instants")
    func feedItems() throws {
        let control = (0..<0x20).map { String(UnicodeScalar(UInt8($0))) }.joined()
        let items = [
            item(),
            item(subject: ("implant", "IMP-19"), tags: ["team:sales", "site/lyon"], expiresAt: Date(timeIntervalSince1970: 1_800_000_000)),
            item(subject: ("patient", nil), read: true),
            item(url: "https://clinic.example/patients/p-17?tab=implants&x=\"q\"#top"),
            item(title: "Quote \" backslash \\ slash / tab \t newline \n", body: control + "\u{7F}"),
            item(title: "Ünïcödé — 東京 🦷 \u{2028}\u{2029}", body: "<b>&amp;</b> 'single'"),
            item(createdAt: Date(timeIntervalSince1970: 1_795_255_200.999)),
            item(createdAt: Date(timeIntervalSince1970: 951_782_400)), // 2000-02-29
            item(createdAt: Date(timeIntervalSince1970: 4_107_542_399)), // 2100-02-28T23:59:59Z
            item(createdAt: Date(timeIntervalSince1970: -86_401)), // before the epoch
            item(title: "", body: ""),
        ]
        for item in items {
            #expect(FeedJSON.feedItem(item) == (try encoded(item)))
        }
    }

    @Test("first pages: empty, one item, several with a cursor after them")
    func feedPages() throws {
        let several = [
            item(), item(subject: ("implant", "IMP-19"), tags: ["a/b"], read: true, url: "https://a.example/b"), item(title: "\"q\""),
        ]
        let pages: [([FeedItem], String?)] = [([], nil), ([item()], nil), (several, FeedCursor(read: true, id: UUID()).encoded)]
        for (items, next) in pages {
            let page = Components.Schemas.FeedPage(items: try items.map(Components.Schemas.FeedItem.init), nextCursor: next)
            let encoded = try FeedStreamSession.json(page)
            #expect(FeedJSON.feedPage(items, next: next) == encoded)
        }
    }

    @Test("a feed cursor is JSONEncoder's object in base64url: it reads back, and so do cursors JSONEncoder wrote")
    func cursors() throws {
        for cursor in [FeedCursor(read: false, id: UUID()), FeedCursor(read: true, id: UUID())] {
            #expect(try FeedCursor(encoded: cursor.encoded) == cursor)
            let written = try JSONEncoder().encode(cursor)
            #expect(try FeedCursor(encoded: written.base64URLEncoded) == cursor)
            // The same object (JSONEncoder's key order is not fixed without .sortedKeys).
            let mine = try #require(Data(base64URLEncoded: cursor.encoded))
            let (object, expected) = (try JSONSerialization.jsonObject(with: mine), try JSONSerialization.jsonObject(with: written))
            #expect(object as? NSDictionary == expected as? NSDictionary)
        }
    }

    @Test("unread counts: no categories, several, keys in the encoder's order")
    func unreadCounts() throws {
        let counts = [
            UnreadCount(total: 0, byCategory: [:]),
            UnreadCount(total: 7, byCategory: ["alerts": 3, "activity": 4]),
            UnreadCount(total: 5, byCategory: ["a10": 1, "a9": 1, "B": 1, "a_b": 1, "a-b": 1]),
        ]
        for count in counts {
            let encoded = try FeedStreamSession.json(
                Components.Schemas.UnreadCount(total: count.total, byCategory: .init(additionalProperties: count.byCategory)))
            #expect(FeedJSON.unreadCount(count) == encoded)
        }
    }
}
