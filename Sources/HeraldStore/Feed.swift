import Foundation
import HeraldCore
import PostgresNIO

/// One in-app notification as its recipient sees it.
public struct FeedItem: Sendable, Equatable {
    public var id: UUID
    public var eventID: UUID
    public var typeKey: String
    public var categoryKey: String
    public var severity: Severity
    public var priority: Priority
    public var title: String
    public var body: String
    public var subjectType: String?
    public var subjectID: String?
    public var read: Bool
    public var archived: Bool
    public var createdAt: Date
    public var expiresAt: Date?
    /// The event's tags (`team:sales`).
    public var tags: [String] = []
    /// Where the notification leads: its event's `url` (0047).
    public var url: String?
}

/// Filters of the feed; nil means no filter.
public struct FeedFilter: Sendable, Equatable {
    public var typeKey: String?
    public var categoryKey: String?
    public var severity: Severity?
    public var priority: Priority?
    public var read: Bool?
    /// false (default): archived rows are hidden; true: only archived rows.
    public var archived: Bool
    public var since: Date?
    public var search: String?
    /// Rows whose event carries every one of these tags.
    public var tags: [String]?

    public init(
        typeKey: String? = nil, categoryKey: String? = nil, severity: Severity? = nil, priority: Priority? = nil,
        read: Bool? = nil, archived: Bool = false, since: Date? = nil, search: String? = nil, tags: [String]? = nil
    ) {
        self.tags = tags
        self.typeKey = typeKey
        self.categoryKey = categoryKey
        self.severity = severity
        self.priority = priority
        self.read = read
        self.archived = archived
        self.since = since
        self.search = search
    }
}

/// Where a feed page ends: the row's read flag (unread first) and its id.
public struct FeedCursor: Sendable, Equatable, Codable {
    public var read: Bool
    public var id: UUID

    public init(read: Bool, id: UUID) {
        self.read = read
        self.id = id
    }
}

/// Counts for the bell.
public struct UnreadCount: Sendable, Equatable {
    public var total: Int
    public var byCategory: [String: Int]
}

/// Counts of notifications by type, category and state.
public struct NotificationStats: Sendable, Equatable {
    public var total: Int
    public var byType: [String: Int]
    public var byCategory: [String: Int]
    public var byState: [String: Int]
}

/// The feed endpoints run in a transaction opened with `recipient:` set, so row-level
/// security confines them to the user's own rows; the statements also say `user_id = me`.
extension TenantTransaction {
    /// A page of the user's feed, unread first, newest first within each.
    public func feed(
        of userID: UUID, filter: FeedFilter, limit: Int, after cursor: FeedCursor?, now: Date
    ) async throws -> (items: [FeedItem], next: FeedCursor?) {
        // The bell's first page (no filter, no cursor) is the hottest read: its plan is kept.
        if cursor == nil, filter == FeedFilter() {
            let rows = try await query(prepared: FirstFeedPage(organisationID: organisationID, userID: userID, now: now, limit: limit + 1))
            return Self.page(try rows.map(decodeFeedItem), limit: limit)
        }
        let rows = try await query(feedQuery(of: userID, filter: filter, limit: limit, after: cursor, now: now))
        return Self.page(try rows.map(decodeFeedItem), limit: limit)
    }

    /// The general statement of `feed` (every page but the bell's first; the plan guards explain it).
    func feedQuery(of userID: UUID, filter: FeedFilter, limit: Int, after cursor: FeedCursor?, now: Date) -> PostgresQuery {
        """
        WITH rows AS (
          \(unescaped: feedSelect)
          WHERE n.organisation_id = \(organisationID) AND n.user_id = \(userID) AND n.visible_at <= \(now) AND (n.expires_at IS NULL OR n.expires_at > \(now))
            AND (n.archived_at IS NOT NULL) = \(filter.archived)
            AND (\(filter.typeKey)::text IS NULL OR t.key = \(filter.typeKey))
            AND (\(filter.categoryKey)::text IS NULL OR c.key = \(filter.categoryKey))
            AND (\(filter.severity)::text IS NULL OR n.severity = \(filter.severity))
            AND (\(filter.priority)::text IS NULL OR n.priority = \(filter.priority))
            AND (\(filter.since)::timestamptz IS NULL OR n.visible_at >= \(filter.since))
            AND (\(filter.search)::text IS NULL OR nc.search @@ websearch_to_tsquery('simple', \(filter.search)))
            AND (\(filter.tags)::text[] IS NULL OR e.tags @> \(filter.tags)::text[])
        )
        SELECT * FROM rows
        WHERE (\(filter.read)::boolean IS NULL OR read = \(filter.read))
          AND (\(cursor?.id)::uuid IS NULL OR read > \(cursor?.read) OR (read = \(cursor?.read) AND id < \(cursor?.id)))
        ORDER BY read, id DESC
        LIMIT \(limit + 1)
        """
    }

    /// `limit` items and the cursor after them, from up to `limit + 1` read.
    static func page(_ items: [FeedItem], limit: Int) -> (items: [FeedItem], next: FeedCursor?) {
        guard items.count > limit else { return (items, nil) }
        let page = Array(items.prefix(limit))
        return (page, page.last.map { FeedCursor(read: $0.read, id: $0.id) })
    }

    /// Unread, visible, unexpired, unarchived rows: in all and per category. Only rows above the
    /// settled watermark, or pinned unread, can be unread, so this reads recent rows only
    /// (notifications_unread and notifications_pinned), whatever the size of the feed.
    public func unreadCount(of userID: UUID, now: Date) async throws -> UnreadCount {
        try UnreadCount(rows: try await query(prepared: UnreadCountByCategory(organisationID: organisationID, userID: userID, now: now)))
    }

    /// One row of the user's feed.
    public func feedItem(_ id: UUID, of userID: UUID, now: Date) async throws -> FeedItem {
        let rows = try await query(
            """
            \(unescaped: feedSelect)
            WHERE n.organisation_id = \(organisationID) AND n.id = \(id) AND n.user_id = \(userID) AND n.visible_at <= \(now) AND (n.expires_at IS NULL OR n.expires_at > \(now))
            """)
        guard let row = rows.first else { throw StoreError.notFound("notification") }
        return try decodeFeedItem(row)
    }

    /// Marks one row read or unread. An explicit unread survives a later "all read" watermark
    /// only until the next "all read" (which covers it again).
    public func setRead(_ id: UUID, of userID: UUID, read: Bool, now: Date) async throws -> FeedItem {
        let rows = try await query(
            """
            UPDATE notifications SET read_at = CASE WHEN \(read) THEN coalesce(read_at, \(now)) ELSE NULL END, unread_pinned = NOT \(read)
            WHERE organisation_id = \(organisationID) AND id = \(id) AND user_id = \(userID) AND visible_at <= \(now) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("notification") }
        return try await feedItem(id, of: userID, now: now)
    }

    /// Archives one row (it leaves the default feed and the unread count).
    public func archive(_ id: UUID, of userID: UUID, now: Date) async throws -> FeedItem {
        let rows = try await query(
            "UPDATE notifications SET archived_at = coalesce(archived_at, \(now)) WHERE organisation_id = \(organisationID) AND id = \(id) AND user_id = \(userID) AND visible_at <= \(now) RETURNING id"
        )
        guard !rows.isEmpty else { throw StoreError.notFound("notification") }
        return try await feedItem(id, of: userID, now: now)
    }

    /// Marks the listed rows read; returns how many of them are the user's.
    public func markRead(_ ids: [UUID], of userID: UUID, now: Date) async throws -> Int {
        try await query(
            """
            UPDATE notifications SET read_at = coalesce(read_at, \(now)), unread_pinned = false
            WHERE organisation_id = \(organisationID) AND id = ANY(\(ids)::uuid[]) AND user_id = \(userID) AND visible_at <= \(now) RETURNING id
            """
        ).count
    }

    /// Marks everything up to `watermark` read in one statement, whatever the feed's size: the
    /// watermark moves forward with this transaction's snapshot (rows of transactions still
    /// running stay unread), and only rows explicitly marked unread are touched.
    /// `settled` is the id below which no notify transaction can still be running (15 minutes
    /// before the click by default).
    public func markAllRead(of userID: UUID, through watermark: UUID, settled: UUID? = nil) async throws {
        let settled = settled ?? TimeOrderedID.upperBound(at: Date().addingTimeInterval(-TimeOrderedID.settlingTime))
        try await query(
            """
            WITH mark AS (
                INSERT INTO feed_state (organisation_id, user_id, read_through, read_snapshot, read_settled)
                VALUES (\(organisationID), \(userID), \(watermark), pg_current_snapshot(), least(\(settled), \(watermark)))
                ON CONFLICT (organisation_id, user_id) DO UPDATE
                SET (read_through, read_snapshot, read_settled) =
                    (SELECT excluded.read_through, excluded.read_snapshot, greatest(excluded.read_settled, feed_state.read_settled)
                     WHERE excluded.read_through >= feed_state.read_through
                     UNION ALL SELECT feed_state.read_through, feed_state.read_snapshot, feed_state.read_settled
                     WHERE excluded.read_through < feed_state.read_through),
                    updated_at = now()
                RETURNING read_through, read_snapshot, read_settled
            )
            UPDATE notifications SET unread_pinned = false
            WHERE organisation_id = \(organisationID) AND user_id = \(userID) AND unread_pinned AND id <= (SELECT read_through FROM mark)
              AND (id <= (SELECT read_settled FROM mark) OR pg_visible_in_snapshot(created_xid, (SELECT read_snapshot FROM mark)))
            """)
    }

    /// Deletes one row.
    public func deleteNotification(_ id: UUID, of userID: UUID) async throws {
        guard
            !(try await query(
                "DELETE FROM notifications WHERE organisation_id = \(organisationID) AND id = \(id) AND user_id = \(userID) AND visible_at <= now() RETURNING id"
            )).isEmpty
        else {
            throw StoreError.notFound("notification")
        }
    }

    /// Deletes every row of the user's feed; returns how many.
    public func clearFeed(of userID: UUID) async throws -> Int {
        try await query(
            "DELETE FROM notifications WHERE organisation_id = \(organisationID) AND user_id = \(userID) AND visible_at <= now() RETURNING 1"
        ).count
    }

    /// Counts by type, category and state for one user or (nil) the whole organisation.
    public func notificationStats(userID: UUID?, since: Date?, until: Date?) async throws -> NotificationStats {
        let rows = try await query(
            """
            SELECT t.key, c.key,
                   CASE WHEN n.archived_at IS NOT NULL THEN 'archived' WHEN notification_read(n, fs) THEN 'read' ELSE 'unread' END,
                   count(*)::int
            FROM notifications n
            JOIN notification_types t ON t.organisation_id = n.organisation_id AND t.id = n.type_id
            JOIN categories c ON c.organisation_id = n.organisation_id AND c.id = n.category_id
            LEFT JOIN feed_state fs ON fs.organisation_id = n.organisation_id AND fs.user_id = n.user_id
            WHERE n.organisation_id = \(organisationID) AND (\(userID)::uuid IS NULL OR n.user_id = \(userID)) AND n.visible_at <= now()
              AND (\(since)::timestamptz IS NULL OR n.visible_at >= \(since))
              AND (\(until)::timestamptz IS NULL OR n.visible_at < \(until))
            GROUP BY 1, 2, 3
            """)
        var stats = NotificationStats(total: 0, byType: [:], byCategory: [:], byState: ["unread": 0, "read": 0, "archived": 0])
        for row in rows {
            let (type, category, state, count) = try row.decode((String, String, String, Int).self)
            stats.total += count
            stats.byType[type, default: 0] += count
            stats.byCategory[category, default: 0] += count
            stats.byState[state, default: 0] += count
        }
        return stats
    }

}

/// Herald's prepared statements hand back their rows as they come; the caller decodes them
/// with the same functions as the unprepared reads.
extension PostgresPreparedStatement where Row == PostgresRow {
    func decodeRow(_ row: PostgresRow) throws -> PostgresRow { row }
}

/// The unread count of `unreadCount(of:now:)`, per category: a prepared statement (the bell
/// asks for it on every page and after every change). The statement is `feed_unread_count`
/// (migration 0031), which `bell_unread_count` runs too.
struct UnreadCountByCategory: PostgresPreparedStatement {
    typealias Row = PostgresRow
    static let name = "herald_unread_count_v2"
    static let sql = "SELECT category_key, unread FROM feed_unread_count($1, $2, $3)"
    var organisationID: UUID
    var userID: UUID
    var now: Date

    func makeBindings() throws -> PostgresBindings {
        var bindings = PostgresBindings(capacity: 3)
        bindings.append(organisationID)
        bindings.append(userID)
        bindings.append(now)
        return bindings
    }
}

/// The first page of the default feed (unarchived, no filter): what `feed(of:…)` runs without
/// a filter or a cursor, as a prepared statement. Same rows, same order as the general query.
///
/// The statement is `feed_first_page_v2` (migration 0031, with the event's link since 0047 and
/// under this name since 0048; `bell_first_page_v2` runs it too), an SQL
/// function the planner inlines: unread first, newest first within each, in two legs that walk
/// indexes newest first and stop at the page's size, so the cost follows the page, not the feed
/// (issue 12: sorting every row of the user by its read flag took 624 ms at 100 000 rows).
struct FirstFeedPage: PostgresPreparedStatement {
    typealias Row = PostgresRow
    static let name = "herald_first_feed_page_v4"
    static let sql = "SELECT * FROM feed_first_page_v2($1, $2, $3, $4)"
    var organisationID: UUID
    var userID: UUID
    var now: Date
    var limit: Int

    func makeBindings() throws -> PostgresBindings {
        var bindings = PostgresBindings(capacity: 4)
        bindings.append(organisationID)
        bindings.append(userID)
        bindings.append(now)
        bindings.append(limit)
        return bindings
    }
}

/// What a feed row shows, with its read flag; callers add the WHERE clause.
let feedSelect = """
    SELECT n.id, n.event_id, t.key AS type_key, c.key AS category_key, n.severity, n.priority, coalesce(n.title, nc.title), coalesce(n.body, nc.body),
           e.subject_type, e.subject_id, notification_read(n, fs) AS read, n.archived_at IS NOT NULL AS archived,
           n.visible_at, n.expires_at, e.tags, e.url
    FROM notifications n
    JOIN notification_contents nc ON nc.organisation_id = n.organisation_id AND nc.id = n.content_id
    JOIN events e ON e.organisation_id = n.organisation_id AND e.id = n.event_id
    JOIN notification_types t ON t.organisation_id = n.organisation_id AND t.id = n.type_id
    JOIN categories c ON c.organisation_id = n.organisation_id AND c.id = n.category_id
    LEFT JOIN feed_state fs ON fs.organisation_id = n.organisation_id AND fs.user_id = n.user_id
    """

/// A row of `feedSelect` or `feed_first_page`, cell by cell: the variadic `row.decode((…).self)`
/// went through generic metadata lookups per column, 8 % of a first page's CPU (issue 12).
func decodeFeedItem(_ row: PostgresRow) throws -> FeedItem {
    var cells = row.makeIterator()
    func next<Value: PostgresDecodable>(_: Value.Type) throws -> Value {
        guard let cell = cells.next() else { throw StoredValueError(column: "notifications", problem: "a column is missing") }
        do {
            return try cell.decode(Value.self)
        } catch let error as PostgresDecodingError {
            throw StoredValueError(error, table: "notifications")
        }
    }
    return FeedItem(
        id: try next(UUID.self), eventID: try next(UUID.self), typeKey: try next(String.self), categoryKey: try next(String.self),
        severity: try next(Severity.self), priority: try next(Priority.self), title: try next(String.self), body: try next(String.self),
        subjectType: try next(String?.self), subjectID: try next(String?.self), read: try next(Bool.self), archived: try next(Bool.self),
        createdAt: try next(Date.self), expiresAt: try next(Date?.self), tags: try next([String].self), url: try next(String?.self))
}
