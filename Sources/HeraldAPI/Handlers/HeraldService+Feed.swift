import Foundation
import HeraldCore
import HeraldStore
import Logging

/// The in-app feed of the calling user. `TenantBoundary` opens every transaction here with the
/// user as `recipient`, so row-level security confines it to their rows; the statements check
/// it too.
extension HeraldService {
    func listMyNotifications(_ input: Operations.ListMyNotifications.Input) async throws -> Operations.ListMyNotifications.Output {
        let user = try requireUser()
        let q = input.query
        let limit = try PageSize.clamp(q.limit)
        let cursor = try q.cursor.map { c in try FeedCursor(encoded: c) }
        let filter = FeedFilter(
            typeKey: q._type, categoryKey: q.category, severity: q.severity.map { mapped($0, to: Severity.self) },
            priority: q.priority.map { mapped($0, to: Priority.self) }, read: q.read, archived: q.archived ?? false,
            since: q.since, search: q.q.flatMap { $0.trimmingCharacters(in: .whitespaces).isEmpty ? nil : $0 },
            tags: try q.tag.flatMap { tags in
                tags.isEmpty ? nil : try tags.map { v throws(ValidationError) in try Validate.tag(v, field: "tag") }
            })
        let now = now()
        let page = try await tenant { tx, _ in
            // Reading one's feed is engagement (the inactivity rule; written at most hourly); a
            // HEAD changes nothing.
            if RequestScope.current?.head != true { try await tx.recordEngagement(of: user, at: now) }
            let page = try await tx.feed(of: user, filter: filter, limit: limit, after: cursor, now: now)
            if page.items.isEmpty { try await refuseUnknownCatalogueKeys(filter, tx) }
            return page
        }
        return .ok(.init(body: .json(.init(items: try page.items.map(Components.Schemas.FeedItem.init), nextCursor: page.next?.encoded))))
    }

    /// An empty page filtered by a type or category key that is not in the catalogue is a typo,
    /// not an empty feed (neither can be deleted while a notification has it): 422 naming it.
    /// Checked only when the page is empty, so a feed with rows pays nothing for it.
    private func refuseUnknownCatalogueKeys(_ filter: FeedFilter, _ tx: TenantTransaction) async throws {
        if let key = filter.typeKey, try await tx.notificationType(key: key) == nil {
            throw APIError.unknownType(key, field: "type")
        }
        if let key = filter.categoryKey, try await tx.category(key: key) == nil {
            throw APIError.unprocessable(ValidationError(field: "category", message: "\"\(key)\" is not a category of your organisation."))
        }
    }

    func getMyUnreadCount(_ input: Operations.GetMyUnreadCount.Input) async throws -> Operations.GetMyUnreadCount.Output {
        let user = try requireUser()
        let now = now()
        let count = try await tenant { tx, _ in try await tx.unreadCount(of: user, now: now) }
        return .ok(.init(body: .json(.init(total: count.total, byCategory: .init(additionalProperties: count.byCategory)))))
    }

    func getMyNotification(_ input: Operations.GetMyNotification.Input) async throws -> Operations.GetMyNotification.Output {
        let (user, id) = (try requireUser(), try id(input.path.notificationId, "notification"))
        let now = now()
        let item = try await tenant { tx, _ in try await tx.feedItem(id, of: user, now: now) }
        return .ok(.init(body: .json(try .init(item))))
    }

    func markNotificationRead(_ input: Operations.MarkNotificationRead.Input) async throws -> Operations.MarkNotificationRead.Output {
        let (user, id) = (try requireUser(), try id(input.path.notificationId, "notification"))
        let now = now()
        let item = try await tenant { tx, _ in try await tx.setRead(id, of: user, read: true, now: now) }
        return .ok(.init(body: .json(try .init(item))))
    }

    func markNotificationUnread(_ input: Operations.MarkNotificationUnread.Input) async throws -> Operations.MarkNotificationUnread.Output {
        let (user, id) = (try requireUser(), try id(input.path.notificationId, "notification"))
        let now = now()
        let item = try await tenant { tx, _ in try await tx.setRead(id, of: user, read: false, now: now) }
        return .ok(.init(body: .json(try .init(item))))
    }

    func archiveNotification(_ input: Operations.ArchiveNotification.Input) async throws -> Operations.ArchiveNotification.Output {
        let (user, id) = (try requireUser(), try id(input.path.notificationId, "notification"))
        let now = now()
        let item = try await tenant { tx, _ in try await tx.archive(id, of: user, now: now) }
        return .ok(.init(body: .json(try .init(item))))
    }

    func deleteMyNotification(_ input: Operations.DeleteMyNotification.Input) async throws -> Operations.DeleteMyNotification.Output {
        let (user, id) = (try requireUser(), try id(input.path.notificationId, "notification"))
        try await tenant { tx, _ in try await tx.deleteNotification(id, of: user) }
        return .noContent(.init())
    }

    func markNotificationsRead(_ input: Operations.MarkNotificationsRead.Input) async throws -> Operations.MarkNotificationsRead.Output {
        let user = try requireUser()
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        // Exactly one of the two (the schema's min/maxProperties).
        guard (body.all == nil) != (body.ids == nil) else {
            throw APIError.unprocessable(ValidationError(field: "body", message: "give either ids or \"all\": true."))
        }
        if body.all == false {
            // Not "nothing": a client that sends false most likely meant something else.
            throw APIError.unprocessable(
                ValidationError(field: "all", message: "must be true (mark everything visible now read); to mark some, give their ids."))
        }
        let all = body.all ?? false
        let ids = try (body.ids ?? []).map { v throws(ValidationError) in try Validate.uuid(v, field: "ids") }
        let now = now()
        let count: Int? = try await tenant { tx, _ in
            if all {
                // Everything visible now: the largest UUID v7 of this millisecond.
                try await tx.markAllRead(of: user, through: TimeOrderedID.upperBound(at: now))
                return nil
            }
            return try await tx.markRead(ids, of: user, now: now)
        }
        return .ok(.init(body: .json(.init(count: count))))
    }

    func clearMyNotifications(_ input: Operations.ClearMyNotifications.Input) async throws -> Operations.ClearMyNotifications.Output {
        let user = try requireUser()
        let count = try await tenant { tx, _ in try await tx.clearFeed(of: user) }
        return .ok(.init(body: .json(.init(count: count))))
    }

    func getMyNotificationStats(_ input: Operations.GetMyNotificationStats.Input) async throws -> Operations.GetMyNotificationStats.Output {
        let user = try requireUser()
        try Validate.window(since: input.query.since, until: input.query.until)
        let stats = try await tenant { tx, _ in
            try await tx.notificationStats(userID: user, since: input.query.since, until: input.query.until)
        }
        return .ok(.init(body: .json(.init(stats))))
    }

    func getNotificationStats(_ input: Operations.GetNotificationStats.Input) async throws -> Operations.GetNotificationStats.Output {
        let user = try input.query.userId.map { v in try Validate.uuid(v, field: "user_id") }
        try Validate.window(since: input.query.since, until: input.query.until)
        let stats = try await tenant { tx, _ in
            if let user { _ = try await tx.user(user) }
            return try await tx.notificationStats(userID: user, since: input.query.since, until: input.query.until)
        }
        return .ok(.init(body: .json(.init(stats))))
    }
}

extension FeedCursor {
    /// The cursor as a client sees it: base64url of a small JSON object.
    var encoded: String {
        // What `JSONEncoder().encode(self)` writes (its fields in declaration order, the id as
        // `uuidString`), without the encoder: a cursor ends every full first page.
        base64URLEncodedString("{\"read\":\(read),\"id\":\"\(id.uppercased)\"}".utf8)
    }

    init(encoded: String) throws(ValidationError) {
        guard let data = Data(base64URLEncoded: encoded), let cursor = try? JSONDecoder().decode(FeedCursor.self, from: data) else {
            throw ValidationError(field: "cursor", message: "is not a cursor returned by this API.")
        }
        self = cursor
    }
}

extension Components.Schemas.FeedItem {
    init(_ n: FeedItem) throws {
        self.init(
            id: n.id.lowercased, eventId: n.eventID.lowercased, _type: n.typeKey, category: n.categoryKey,
            severity: mapped(n.severity), priority: mapped(n.priority), title: n.title, body: n.body,
            subject: n.subjectType.map { .init(_type: $0, id: n.subjectID ?? "") }, read: n.read, archived: n.archived,
            createdAt: n.createdAt, expiresAt: n.expiresAt, tags: n.tags.isEmpty ? nil : n.tags, url: n.url)
    }
}

extension Components.Schemas.Stats {
    init(_ s: NotificationStats) {
        self.init(
            total: s.total, byType: .init(additionalProperties: s.byType), byCategory: .init(additionalProperties: s.byCategory),
            byState: .init(additionalProperties: s.byState))
    }
}
