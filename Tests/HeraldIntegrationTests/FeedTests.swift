import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

@Suite("In-app feed")
struct FeedTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    @Test(
        "the bell's prepared reads, and the same in one statement, give what the general query gives, prepared or not (HERALD_PREPARED_STATEMENTS=0)"
    )
    func preparedReads() async throws {
        try await withCatalogue { org, _, _ in
            for i in 0..<25 { try await org.assignTask(to: [org.memberID], title: "t\(i)") }
            let unprepared = Database(client: env.appClient, logger: env.logger, preparedStatements: false)
            /// The first page as the bell reads it, against the general query (a `since` long
            /// past selects the same rows through it), prepared and not.
            func compare(limit: Int, unread: Int, _ comment: Comment) async throws {
                let now = Date()
                for database in [env.database, unprepared] {
                    let (first, general, count) = try await database.withTenant(org.id) { tx in
                        (
                            try await tx.feed(of: org.memberID, filter: FeedFilter(), limit: limit, after: nil, now: now),
                            try await tx.feed(
                                of: org.memberID, filter: FeedFilter(since: .distantPast), limit: limit, after: nil, now: now),
                            try await tx.unreadCount(of: org.memberID, now: now)
                        )
                    }
                    #expect(first.items.map(\.id) == general.items.map(\.id), comment)
                    #expect(first.items.map(\.read) == general.items.map(\.read), comment)
                    #expect(first.next == general.next, comment)
                    #expect(first.items.count == min(limit, general.items.count), comment)
                    #expect(count.total == unread, comment)
                    #expect(first.items.filter { !$0.read }.count == min(limit, unread), "unread first: \(comment)")
                    // The same reads in one statement each (migration 0031), prepared and not.
                    let bell = try #require(
                        try await database.bellFirstPage(
                            organisationID: org.id, userID: org.memberID, now: now, limit: limit,
                            permission: Permission.notificationsRead.rawValue))
                    #expect(bell.items == first.items, comment)
                    #expect(bell.next == first.next, comment)
                    let bellCount = try await database.bellUnreadCount(
                        organisationID: org.id, userID: org.memberID, now: now, permission: Permission.notificationsRead.rawValue)
                    #expect(bellCount == count, comment)
                }
            }
            try await org.store { tx in
                let some = try await tx.feed(of: org.memberID, filter: FeedFilter(), limit: 4, after: nil, now: Date())
                _ = try await tx.markRead(some.items.map(\.id), of: org.memberID, now: Date())
                _ = try await tx.archive(some.items[0].id, of: org.memberID, now: Date())
            }
            try await compare(limit: 20, unread: 21, "a page of unread rows only")
            try await compare(limit: 24, unread: 21, "unread rows, then the newest read ones")
            // "All read" (a watermark), one row unread again (pinned), two new rows above the mark.
            let all = try await org.store { tx in
                try await tx.feed(of: org.memberID, filter: FeedFilter(), limit: 30, after: nil, now: Date()).items
            }
            try await org.store { tx in try await tx.markAllRead(of: org.memberID, through: TimeOrderedID.upperBound(at: Date())) }
            try await org.store { tx in _ = try await tx.setRead(all[10].id, of: org.memberID, read: false, now: Date()) }
            for i in 0..<2 { try await org.assignTask(to: [org.memberID], title: "after all read \(i)") }
            try await compare(limit: 20, unread: 3, "after all read: two new rows and one pinned unread first")
            try await compare(limit: 2, unread: 3, "a page shorter than the unread rows")
        }
    }

    @Test("pagination returns every row exactly once while new rows keep arriving")
    func paginationUnderInserts() async throws {
        try await withCatalogue { org, _, client in
            for i in 0..<30 { try await org.assignTask(to: [org.memberID], title: "before \(i)") }
            try await org.store { tx in
                // Some read, some unread: the unread-first order has two runs to page through.
                let page = try await tx.feed(of: org.memberID, filter: FeedFilter(), limit: 10, after: nil, now: Date())
                _ = try await tx.markRead(page.items.map(\.id), of: org.memberID, now: Date())
            }
            var seen: [String] = []
            var cursor: String?
            var page = 0
            repeat {
                let response = try await client.send(
                    .get, "/v1/me/notifications?limit=7" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.memberToken)
                #expect(response.status == .ok)
                let feed = try response.decoded(Components.Schemas.FeedPage.self)
                seen += feed.items.map(\.title)
                cursor = feed.nextCursor
                // New notifications arrive between pages.
                try await org.assignTask(to: [org.memberID], title: "during \(page)")
                page += 1
            } while cursor != nil
            let before = seen.filter { $0.hasPrefix("before") }
            #expect(before.count == 30)
            #expect(Set(before).count == 30)
            #expect(Set(seen).count == seen.count, "a row came twice")
            // Unread first: the ten read rows come last.
            #expect(seen.suffix(10).allSatisfy { $0.hasPrefix("before") })
        }
    }

    @Test("read, unread, archive, delete, mark many, mark all, clear; the count follows")
    func readState() async throws {
        try await withCatalogue { org, _, client in
            for i in 0..<5 { try await org.assignTask(to: [org.memberID], title: "t\(i)") }
            func unread() async throws -> Int {
                try await client.send(.get, "/v1/me/notifications/unread-count", token: org.memberToken)
                    .decoded(Components.Schemas.UnreadCount.self).total
            }
            func item(_ method: HTTPRequest.Method, _ path: String) async throws -> Components.Schemas.FeedItem {
                try await client.send(method, path, token: org.memberToken).decoded(Components.Schemas.FeedItem.self)
            }
            let ids = try await client.send(.get, "/v1/me/notifications", token: org.memberToken)
                .decoded(Components.Schemas.FeedPage.self).items.map(\.id)
            #expect(ids.count == 5)
            #expect(try await unread() == 5)
            #expect(try await item(.post, "/v1/me/notifications/\(ids[0])/read").read == true)
            #expect(try await unread() == 4)
            let many = try await client.send(
                .post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"ids": ["\#(ids[1])", "\#(ids[2])"]}"#)
            #expect(try many.decoded(Components.Schemas.Affected.self).count == 2)
            #expect(try await unread() == 2)
            #expect(try await item(.post, "/v1/me/notifications/\(ids[3])/archive").archived == true)
            #expect(try await unread() == 1)
            let archived = try await client.send(.get, "/v1/me/notifications?archived=true", token: org.memberToken)
            #expect(try archived.decoded(Components.Schemas.FeedPage.self).items.count == 1)
            #expect(
                try await client.send(.post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"all": true}"#).status
                    == .ok)
            #expect(try await unread() == 0)
            // Unread again after "all read": it stays unread until the next "all read".
            #expect(try await item(.post, "/v1/me/notifications/\(ids[0])/unread").read == false)
            #expect(try await unread() == 1)
            let unreadOnly = try await client.send(.get, "/v1/me/notifications?read=false", token: org.memberToken)
            #expect(try unreadOnly.decoded(Components.Schemas.FeedPage.self).items.map(\.id) == [ids[0]])
            // New rows after the watermark are unread.
            try await org.assignTask(to: [org.memberID], title: "new")
            #expect(try await unread() == 2)
            #expect(try await client.send(.delete, "/v1/me/notifications/\(ids[4])", token: org.memberToken).status == .noContent)
            #expect(try await client.send(.get, "/v1/me/notifications/\(ids[4])", token: org.memberToken).isProblem(.notFound))
            let bad = try await client.send(.post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{}"#)
            #expect(bad.isProblem(.unprocessableContent))
            let cleared = try await client.send(.delete, "/v1/me/notifications", token: org.memberToken)
            #expect(try cleared.decoded(Components.Schemas.Affected.self).count == 5)
            #expect(try await unread() == 0)
        }
    }

    @Test("filters and full-text search in title and body")
    func filtersAndSearch() async throws {
        try await withCatalogue { org, _, client in
            try await org.assignTask(to: [org.memberID], title: "Review the implant protocol")
            try await org.assignTask(to: [org.memberID], title: "Order gloves")
            try await org.notify(
                EventRequest(
                    typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]),
                    payload: .object(["isq": .number(25), "threshold": .number(55), "implant": .string("IMP-7")])))
            func titles(_ query: String) async throws -> [String] {
                let response = try await client.send(.get, "/v1/me/notifications?\(query)", token: org.memberToken)
                #expect(response.status == .ok, "\(query): \(response.text)")
                return try response.decoded(Components.Schemas.FeedPage.self).items.map(\.title)
            }
            #expect(try await titles("q=implant").count == 2) // title of one, body of the alert
            #expect(try await titles("q=gloves") == ["Order gloves"])
            #expect(try await titles("type=ISQ_CRITICAL") == ["Critical ISQ 25"])
            #expect(try await titles("category=activity").count == 2)
            #expect(try await titles("severity=CRITICAL").count == 1)
            #expect(try await titles("priority=low").isEmpty)
            #expect(try await titles("since=2999-01-01T00:00:00Z").isEmpty)
            let stats = try await client.send(.get, "/v1/me/notifications/stats", token: org.memberToken)
            let counted = try stats.decoded(Components.Schemas.Stats.self)
            #expect(counted.total == 3)
            #expect(counted.byCategory.additionalProperties["activity"] == 2)
            let orgStats = try await client.send(.get, "/v1/notifications/stats", token: org.ownerToken)
            #expect(try orgStats.decoded(Components.Schemas.Stats.self).byType.additionalProperties["ISQ_CRITICAL"] == 1)
            // A window that ends before it starts is refused, naming until, on both.
            for (path, token) in [("/v1/me/notifications/stats", org.memberToken), ("/v1/notifications/stats", org.ownerToken)] {
                let reversed = try await client.send(.get, "\(path)?since=2026-12-02T00:00:00Z&until=2026-12-01T00:00:00Z", token: token)
                #expect(
                    reversed.isProblem(.unprocessableContent) && (reversed.json["detail"] as? String ?? "").contains("until"),
                    "\(reversed.text)")
            }
        }
    }

    @Test("a user never sees another user's rows of the same organisation, through the API")
    func ownRowsOnlyThroughAPI() async throws {
        try await withCatalogue { org, _, client in
            try await org.assignTask(to: [org.ownerID], title: "for the owner")
            try await org.assignTask(to: [org.memberID], title: "for the member")
            let owner = try await client.send(.get, "/v1/me/notifications", token: org.ownerToken)
            let ownerID = try #require(try owner.decoded(Components.Schemas.FeedPage.self).items.first?.id)
            let member = try await client.send(.get, "/v1/me/notifications", token: org.memberToken)
            #expect(try member.decoded(Components.Schemas.FeedPage.self).items.map(\.title) == ["for the member"])
            for (method, path) in [
                (HTTPRequest.Method.get, "/v1/me/notifications/\(ownerID)"), (.post, "/v1/me/notifications/\(ownerID)/read"),
                (.post, "/v1/me/notifications/\(ownerID)/archive"), (.delete, "/v1/me/notifications/\(ownerID)"),
            ] {
                #expect(try await client.send(method, path, token: org.memberToken).isProblem(.notFound), "\(path)")
            }
            let many = try await client.send(
                .post, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"ids": ["\#(ownerID)"]}"#)
            #expect(try many.decoded(Components.Schemas.Affected.self).count == 0)
            let ownerUnread = try await client.send(.get, "/v1/me/notifications/unread-count", token: org.ownerToken)
            #expect(try ownerUnread.decoded(Components.Schemas.UnreadCount.self).total == 1)
            // API keys have no feed.
            let serviceRole = try await org.store { tx in try await tx.builtinRole(.service).id.uuidString.lowercased() }
            let key = try await client.send(
                .post, "/v1/api-keys", token: org.ownerToken, json: #"{"name": "k", "role_id": "\#(serviceRole)"}"#)
            let secret = try key.decoded(Components.Schemas.ApiKeyCreated.self).secret
            #expect(try await client.send(.get, "/v1/me/notifications", token: secret).isProblem(.forbidden))
        }
    }

    @Test("a user never sees another user's rows of the same organisation, in SQL as the application role")
    func ownRowsOnlyInSQL() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await org.assignTask(to: [org.ownerID, org.memberID], title: "for both")
        // As the member: the owner's row is invisible even when asked for by user id.
        let counts = try await env.database.withTenant(org.id, actor: .user(org.memberID), recipient: org.memberID) { tx in
            (
                try await tx.notificationStats(userID: org.ownerID, since: nil, until: nil).total,
                try await tx.notificationStats(userID: nil, since: nil, until: nil).total,
                try await tx.clearFeed(of: org.ownerID)
            )
        }
        #expect(counts.0 == 0)
        #expect(counts.1 == 1)
        #expect(counts.2 == 0)
        // Directly, as the application role with the feed's settings.
        let rows = try await env.appClient.withTransaction(logger: env.logger) { connection in
            try await connection.query(
                "SELECT set_config('app.org_id', \(org.id.uuidString), true), set_config('app.recipient_id', \(org.memberID.uuidString), true)",
                logger: env.logger)
            let visible = try await connection.query(
                "SELECT count(*)::int FROM notifications WHERE user_id = \(org.ownerID)", logger: env.logger
            ).collect()
            let updated = try await connection.query(
                "UPDATE notifications SET read_at = now() WHERE user_id = \(org.ownerID) RETURNING 1", logger: env.logger
            ).collect()
            return (try visible[0].decode(Int.self), updated.count)
        }
        #expect(rows.0 == 0)
        #expect(rows.1 == 0)
        // The owner's row is still there for the owner.
        let owner = try await env.database.withTenant(org.id, recipient: org.ownerID) { tx in
            try await tx.unreadCount(of: org.ownerID, now: Date()).total
        }
        #expect(owner == 1)
    }

    @Test("mark all read during a notify that has not committed yet leaves that notify's rows unread")
    func markAllDuringFanOut() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await org.assignTask(to: [org.memberID], title: "earlier")
        let earlier = try await env.database.withTenant(org.id, recipient: org.memberID) { tx in
            try await tx.feed(of: org.memberID, filter: FeedFilter(), limit: 1, after: nil, now: Date()).items[0]
        }
        let (inserted, insertedSignal) = AsyncStream.makeStream(of: Void.self)
        let (marked, markedSignal) = AsyncStream.makeStream(of: Void.self)
        try await withThrowingTaskGroup(of: Void.self) { group in
            // A notify transaction that stamped its row's id a moment ago and commits only after the click.
            group.addTask {
                try await env.database.withTenant(org.id) { tx in
                    try await tx.duplicateFeedForTest(userID: org.memberID, copies: 1, from: earlier.id)
                    insertedSignal.yield()
                    for await _ in marked { break }
                }
            }
            group.addTask {
                // Always release the writer, even if marking fails, so the test cannot hang.
                defer { markedSignal.yield(); markedSignal.finish() }
                for await _ in inserted { break }
                try await env.database.withTenant(org.id, recipient: org.memberID) { tx in
                    try await tx.markAllRead(of: org.memberID, through: TimeOrderedID.upperBound(at: Date()))
                }
            }
            try await group.waitForAll()
        }
        let unread = try await env.database.withTenant(org.id, recipient: org.memberID) { tx in
            try await tx.unreadCount(of: org.memberID, now: Date()).total
        }
        #expect(unread == 1, "the row committed after the click must arrive unread")
    }

    @Test("mark all read at 100 000 rows is one statement that touches none of them")
    func readAllAtScale() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await org.assignTask(to: [org.memberID], title: "seed")
        // 100 000 rows for the member, made in SQL from the seed row (the engine path is benchmarked, not tested for speed).
        try await env.database.withTenant(org.id) { tx in try await tx.duplicateFeedForTest(userID: org.memberID, copies: 100_000) }
        let before = try await updatedTuples()
        let unread = try await env.database.withTenant(org.id, recipient: org.memberID) { tx in
            try await tx.markAllRead(of: org.memberID, through: TimeOrderedID.upperBound(at: Date()))
            return try await tx.unreadCount(of: org.memberID, now: Date()).total
        }
        let after = try await updatedTuples()
        #expect(unread == 0)
        // Stats are counted asynchronously and shared with parallel tests; nowhere near 100 000 either way.
        #expect(after - before < 10_000, "mark all read updated \(after - before) rows")
    }

    func updatedTuples() async throws -> Int {
        try await Task.sleep(for: .milliseconds(600)) // the statistics collector lags a little
        let rows = try await env.appClient.query(
            "SELECT n_tup_upd::int FROM pg_stat_user_tables WHERE relname = 'notifications'", logger: env.logger)
        for try await n in rows.decode(Int.self) { return n }
        return 0
    }
}

extension TenantTransaction {
    /// Test fixture: `copies` copies of the user's newest row (or of `source`), with fresh time-ordered ids.
    func duplicateFeedForTest(userID: UUID, copies: Int, from source: UUID? = nil) async throws {
        try await connection.query(
            """
            -- Each copy keeps the source's content and says its own title (a personal row), so
            -- 100 000 copies write no content rows and no search entries.
            INSERT INTO notifications (organisation_id, id, event_id, user_id, type_id, category_id, severity, priority, content_id,
                                       title, body, visible_at)
            SELECT n.organisation_id,
                   -- a UUID v7 of now: 48 bits of milliseconds over a random UUID
                   encode(overlay(uuid_send(gen_random_uuid()) PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6), 'hex')::uuid,
                   n.event_id, n.user_id, n.type_id, n.category_id, n.severity, n.priority, n.content_id,
                   coalesce(n.title, c.title) || ' ' || g, coalesce(n.body, c.body), n.visible_at - interval '1 second'
            FROM (SELECT * FROM notifications WHERE user_id = \(userID) AND (\(source)::uuid IS NULL OR id = \(source)) ORDER BY id DESC LIMIT 1) n
            JOIN notification_contents c ON c.organisation_id = n.organisation_id AND c.id = n.content_id,
                 generate_series(1, \(copies)) g
            """, logger: logger)
    }
}
