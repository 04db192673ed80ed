import Foundation
import HeraldCore
import PostgresNIO

/// The bell's two reads (the first page of the default feed, the unread count) in ONE statement
/// each (migration 0031, issue 12): the functions enter the tenant, check the caller's grant and
/// read, in the statement's own transaction, where a tenant transaction takes four round trips
/// (BEGIN, the entry, the read, COMMIT).
///
/// Each answers only an active user holding `permission` with nothing to record (for the page:
/// an engagement older than the hour, or a pending inactivity warning). Otherwise it returns nil,
/// and the caller takes the general path (`withTenant`), which refuses or records what is due.
extension Database {
    /// What `feed(of:filter: FeedFilter(), limit:after: nil, now:)` reads, or nil (see above).
    public func bellFirstPage(
        organisationID: UUID, userID: UUID, now: Date, limit: Int, permission: String
    ) async throws -> (items: [FeedItem], next: FeedCursor?)? {
        let rows = try await query(
            prepared: BellFirstPage(
                page: FirstFeedPage(organisationID: organisationID, userID: userID, now: now, limit: limit + 1), permission: permission,
                engagedSince: now.addingTimeInterval(-engagementGranularity)))
        if let first = rows.first, Self.refused(first) { return nil }
        return TenantTransaction.page(try rows.map(decodeFeedItem), limit: limit)
    }

    /// What `unreadCount(of:now:)` reads, or nil (see above).
    public func bellUnreadCount(organisationID: UUID, userID: UUID, now: Date, permission: String) async throws -> UnreadCount? {
        let rows = try await query(
            prepared: BellUnreadCount(
                count: UnreadCountByCategory(organisationID: organisationID, userID: userID, now: now), permission: permission))
        if let first = rows.first, Self.refused(first) { return nil }
        return try UnreadCount(rows: rows)
    }

    /// The one row of NULLs a bell function returns when it does not answer: its first column
    /// (a feed row's id, a count's category) is never NULL otherwise.
    private static func refused(_ row: PostgresRow) -> Bool {
        var cells = row.makeIterator()
        return cells.next()?.bytes == nil
    }
}

extension UnreadCount {
    /// From `(category key, count)` rows.
    init(rows: [PostgresRow]) throws {
        var byCategory: [String: Int] = [:]
        for row in rows {
            let (key, count) = try row.decode((String, Int).self)
            byCategory[key] = count
        }
        self.init(total: byCategory.values.reduce(0, +), byCategory: byCategory)
    }
}

/// `bell_first_page_v2` (migrations 0031, 0048): the general path's first page (`FirstFeedPage`, its first
/// four parameters) and what the grant is checked against.
struct BellFirstPage: PostgresPreparedStatement {
    typealias Row = PostgresRow
    static let name = "herald_bell_first_page_v2"
    static let sql = "SELECT * FROM bell_first_page_v2($1, $2, $3, $4, $5, $6)"
    var page: FirstFeedPage
    var permission: String
    var engagedSince: Date

    func makeBindings() throws -> PostgresBindings {
        var bindings = try page.makeBindings()
        bindings.append(permission)
        bindings.append(engagedSince)
        return bindings
    }
}

/// `bell_unread_count` (migration 0031): the general path's count (`UnreadCountByCategory`, its
/// first three parameters) and the permission the grant must hold.
struct BellUnreadCount: PostgresPreparedStatement {
    typealias Row = PostgresRow
    static let name = "herald_bell_unread_count_v1"
    static let sql = "SELECT * FROM bell_unread_count($1, $2, $3, $4)"
    var count: UnreadCountByCategory
    var permission: String

    func makeBindings() throws -> PostgresBindings {
        var bindings = try count.makeBindings()
        bindings.append(permission)
        return bindings
    }
}
