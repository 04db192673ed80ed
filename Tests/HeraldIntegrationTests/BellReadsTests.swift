import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// The bell's reads in one statement (`BellReads`, migration 0031, issue 12): they answer what the
/// general path answers, byte for byte, and only when the general path would answer 200 without
/// writing anything; every other case goes to the general path, which refuses or writes.
@Suite("Bell reads in one statement")
struct BellReadsTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// Whether the read is answered in one statement (else the general path takes it).
    func answered(_ read: BellReads.Read, _ organisationID: UUID, _ userID: UUID) async throws -> Bool {
        try await BellReads.answer(
            read, for: VerifiedAccess(organisationID: organisationID, userID: userID), permission: .notificationsRead,
            database: env.database, now: Date()) != nil
    }

    func setMember(_ org: TestOrganisation, _ assignment: String) async throws {
        _ = try await org.store { tx in
            try await tx.query(
                PostgresQuery(
                    unsafeSQL: "UPDATE users SET \(assignment) WHERE organisation_id = $1 AND id = $2",
                    binds: {
                        var binds = PostgresBindings()
                        binds.append(org.id)
                        binds.append(org.memberID)
                        return binds
                    }()))
        }
    }

    func lastEngaged(_ org: TestOrganisation) async throws -> (Date, Bool) {
        try await org.store { tx in
            try await tx.query(
                "SELECT last_engaged_at, inactivity_warned_at IS NOT NULL FROM users WHERE organisation_id = \(org.id) AND id = \(org.memberID)"
            ).first!.decode((Date, Bool).self)
        }
    }

    @Test("the first page and the count are the general path's bytes: unread and read rows, a cursor, the default size")
    func sameBytes() async throws {
        try await withCatalogue { org, _, client in
            for i in 0..<25 { try await org.assignTask(to: [org.memberID], title: "t\(i) \"quoted\" / ü") }
            try await org.store { tx in
                let some = try await tx.feed(of: org.memberID, filter: FeedFilter(), limit: 4, after: nil, now: Date())
                _ = try await tx.markRead(some.items.map(\.id), of: org.memberID, now: Date())
                _ = try await tx.archive(some.items[0].id, of: org.memberID, now: Date())
            }
            #expect(try await answered(.firstPage(limit: 20), org.id, org.memberID), "the member's read is answered in one statement")
            // `archived=false` is the default: the same first page through the generated operation.
            for (bell, general) in [
                ("?limit=20", "?limit=20&archived=false"), ("?limit=3", "?limit=3&archived=false"), ("", "?archived=false"),
                ("?limit=200", "?archived=false&limit=200"),
            ] {
                let one = try await client.send(.get, "/v1/me/notifications" + bell, token: org.memberToken)
                let other = try await client.send(.get, "/v1/me/notifications" + general, token: org.memberToken)
                #expect(one.status == .ok && other.status == .ok)
                #expect(one.text == other.text, "\(bell)")
                #expect(one.headers[.contentType] == other.headers[.contentType])
            }
            let page = try await client.send(.get, "/v1/me/notifications?limit=3", token: org.memberToken).decoded(
                Components.Schemas.FeedPage.self)
            let next = try await client.send(
                .get, "/v1/me/notifications?limit=30&cursor=\(try #require(page.nextCursor))", token: org.memberToken
            ).decoded(Components.Schemas.FeedPage.self)
            #expect(next.items.count == 21, "the bell's cursor continues the feed: 24 unarchived rows, 3 on the first page")
            let count = try await client.send(.get, "/v1/me/notifications/unread-count", token: org.memberToken)
            let stored = try await org.store { tx in try await tx.unreadCount(of: org.memberID, now: Date()) }
            #expect(stored.total == 21)
            #expect(
                count.text
                    == (try FeedStreamSession.json(
                        Components.Schemas.UnreadCount(total: stored.total, byCategory: .init(additionalProperties: stored.byCategory)))))
            // Spaces around the token, as the general path allowed.
            let spaced = try await client.send(
                .get, "/v1/me/notifications?limit=3", headers: [.authorization: "Bearer   \(org.memberToken)"])
            #expect(spaced.status == .ok)
        }
    }

    @Test("an engagement to record, or a warning pending, goes to the general path, which records it")
    func engagement() async throws {
        try await withCatalogue { org, _, client in
            try await org.assignTask(to: [org.memberID], title: "one")
            try await setMember(org, "last_engaged_at = now() - interval '2 hours'")
            #expect(!(try await answered(.firstPage(limit: 20), org.id, org.memberID)))
            #expect(try await answered(.unreadCount, org.id, org.memberID), "the count is not engagement")
            #expect(try await client.send(.get, "/v1/me/notifications/unread-count", token: org.memberToken).status == .ok)
            #expect(try await lastEngaged(org).0 < Date().addingTimeInterval(-3_600))
            #expect(try await client.send(.get, "/v1/me/notifications?limit=20", token: org.memberToken).status == .ok)
            #expect(try await lastEngaged(org).0 > Date().addingTimeInterval(-60), "the page read recorded the engagement")
            #expect(try await answered(.firstPage(limit: 20), org.id, org.memberID), "and the next read is answered in one statement")

            try await setMember(org, "inactivity_warned_at = now()")
            #expect(!(try await answered(.firstPage(limit: 20), org.id, org.memberID)))
            #expect(try await client.send(.get, "/v1/me/notifications", token: org.memberToken).status == .ok)
            #expect(try await lastEngaged(org).1 == false, "the read cleared the pending warning")
        }
    }

    @Test("no permission, a deactivated user, another organisation: not answered, and the API refuses as before")
    func refusals() async throws {
        try await withCatalogue { org, _, client in
            try await org.assignTask(to: [org.memberID], title: "one")
            let other = try await TestOrganisation.make()
            // A token's organisation with another organisation's user: nobody there.
            #expect(!(try await answered(.firstPage(limit: 20), other.id, org.memberID)))
            #expect(!(try await answered(.unreadCount, other.id, org.memberID)))

            // Deactivated, still holding the member's role: only `active` refuses.
            try await setMember(org, "active = false")
            #expect(!(try await answered(.firstPage(limit: 20), org.id, org.memberID)))
            #expect(!(try await answered(.unreadCount, org.id, org.memberID)))
            for path in ["/v1/me/notifications?limit=20", "/v1/me/notifications/unread-count"] {
                #expect(try await client.send(.get, path, token: org.memberToken).status == .unauthorized, "\(path)")
            }
            try await setMember(org, "active = true")
            #expect(try await answered(.firstPage(limit: 20), org.id, org.memberID), "active again, with the role")

            // Active, without a role that holds the permission.
            _ = try await org.store { tx in
                try await tx.query("DELETE FROM user_roles WHERE organisation_id = \(org.id) AND user_id = \(org.memberID)")
            }
            #expect(!(try await answered(.firstPage(limit: 20), org.id, org.memberID)))
            #expect(!(try await answered(.unreadCount, org.id, org.memberID)))
            for path in ["/v1/me/notifications?limit=20", "/v1/me/notifications/unread-count"] {
                let response = try await client.send(.get, path, token: org.memberToken)
                #expect(response.status == .forbidden, "\(path): \(response.text)")
                #expect(response.headers[.contentType] == "application/problem+json")
            }
        }
    }

    @Test("only the exact bell reads take the one statement")
    func exactReads() {
        func read(
            _ operationID: String, _ path: String, method: HTTPRequest.Method = .get, accept: String? = nil, headers: HTTPFields = [:]
        ) -> BellReads.Read? {
            var request = HTTPRequest(method: method, scheme: "http", authority: "x", path: path, headerFields: headers)
            if let accept { request.headerFields[.accept] = accept }
            return BellReads.read(operationID: operationID, request: request)
        }
        let page = "listMyNotifications"
        let count = "getMyUnreadCount"
        #expect(read(page, "/v1/me/notifications") == .firstPage(limit: PageSize.default))
        #expect(read(page, "/v1/me/notifications?limit=20") == .firstPage(limit: 20))
        #expect(read(page, "/v1/me/notifications?limit=200") == .firstPage(limit: 200))
        #expect(read(page, "/v1/me/notifications?limit=20", accept: "application/json") == .firstPage(limit: 20))
        #expect(read(page, "/v1/me/notifications?limit=20", accept: "text/html, */*;q=0.1") == .firstPage(limit: 20))
        #expect(read(count, "/v1/me/notifications/unread-count") == .unreadCount)
        for refused in [
            "/v1/me/notifications?limit=0", "/v1/me/notifications?limit=201", "/v1/me/notifications?limit=",
            "/v1/me/notifications?limit=+2",
            "/v1/me/notifications?limit=2x", "/v1/me/notifications?limit=20&cursor=abc", "/v1/me/notifications?read=false",
            "/v1/me/notifications?limit=99999999999999999999999",
        ] {
            #expect(read(page, refused) == nil, "\(refused)")
        }
        #expect(read(page, "/v1/me/notifications?limit=20", accept: "text/html") == nil)
        #expect(read(page, "/v1/me/notifications", method: .head) == nil)
        #expect(read(page, "/v1/me/notifications", headers: [.contentLength: "0"]) == .firstPage(limit: PageSize.default))
        #expect(read(page, "/v1/me/notifications", headers: [.contentLength: "2"]) == nil, "a body: the general path checks it")
        #expect(read(count, "/v1/me/notifications/unread-count", headers: [.transferEncoding: "chunked"]) == nil)
        #expect(read(count, "/v1/me/notifications/unread-count?x=1") == nil)
        #expect(read("getMyNotification", "/v1/me/notifications/abc") == nil)
    }
}
