import Foundation
import HeraldCore
import PostgresNIO

/// One recorded admin change.
public struct AuditEntry: Sendable, Equatable {
    public var id: UUID
    public var occurredAt: Date
    public var actorType: ActorKind
    public var actorID: UUID?
    public var action: String
    public var targetType: String
    public var targetID: String?
    public var before: JSONValue?
    public var after: JSONValue?
    public var requestID: String?
}

/// The actions Herald records, for checking a filter: a name outside it is a typo, not an empty
/// log. `TrialGapTests.auditActionTypos` checks it against every `audit(action:)` in the sources.
public enum AuditAction {
    public static let known: Set<String> = [
        "apikey.create",
        "apikey.delete",
        "apikey.revoke",
        "catalogue.import",
        "category.create",
        "category.delete",
        "category.update",
        "delivery.cancel",
        "delivery.retry",
        "delivery.retry_many",
        "digest_run.retry",
        "digest_template.delete",
        "digest_template.put",
        "endpoint.create",
        "endpoint.delete",
        "endpoint.disable",
        "endpoint.rotate_secret",
        "endpoint.update",
        "event.cancel",
        "event.send_manual",
        "group.create",
        "group.delete",
        "group.member.add",
        "group.member.remove",
        "group.update",
        "job.run",
        "notification_type.create",
        "notification_type.delete",
        "notification_type.update",
        "organisation.create",
        "organisation.rate_limits",
        "organisation.update",
        "preference.unsubscribe",
        "preference_defaults.replace",
        "preferences.replace",
        "role.create",
        "role.delete",
        "role.update",
        "schedule.create",
        "schedule.delete",
        "schedule.pause",
        "schedule.resume",
        "schedule.run",
        "schedule.update",
        "template.delete",
        "template.put",
        "user.create", "user.delete", "user.import",
        "user.deactivate",
        "user.inactivity_switch_off",
        "user.keep_subscribed",
        "user.password.change",
        "user.password.set",
        "user.reactivate",
        "user.roles.set",
        "user.session.start",
        "user.update",
    ]
}

extension AuditAction {
    /// The actions that set values to what the request says (PATCH, PUT, a replaced list): one
    /// that leaves every value as it was is no change.
    static func edits(_ action: String) -> Bool {
        action.hasSuffix(".update") || action.hasSuffix(".replace") || action.hasSuffix(".put") || action == "user.roles.set"
            || action == "organisation.rate_limits"
    }
}

extension TenantTransaction {
    /// Records an admin change in the same transaction as the change itself.
    /// `before` and `after` are JSON objects (the API representation of the target).
    /// An edit that changed nothing (a PATCH or PUT of the values already there: `before` and
    /// `after` the same but for `updated_at`) is not recorded. Other actions always are: a secret
    /// rotated shows the same representation before and after, and is a change all the same.
    public func audit(action: String, targetType: String, targetID: String?, before: JSONValue?, after: JSONValue?) async throws {
        if AuditAction.edits(action), let before, let after, Self.withoutTimestamp(before) == Self.withoutTimestamp(after) { return }
        try await query(
            """
            INSERT INTO audit_log (organisation_id, actor_type, actor_id, action, target_type, target_id, before, after, request_id)
            VALUES (\(organisationID), \(actor.kind), \(actor.id), \(action), \(targetType), \(targetID),
                    \(before.map { JSONDocument($0) }), \(after.map { JSONDocument($0) }), \(requestID))
            """)
    }

    private static func withoutTimestamp(_ value: JSONValue) -> JSONValue {
        guard case .object(var fields) = value else { return value }
        fields["updated_at"] = nil
        return .object(fields)
    }

    /// Audit entries, newest first, after `cursor`.
    public func auditEntries(action: String?, targetID: String?, limit: Int, after cursor: PageCursor?) async throws -> Page<AuditEntry> {
        let rows = try await query(
            """
            SELECT id, occurred_at, actor_type, actor_id, action, target_type, target_id, before, after, request_id
            FROM audit_log
            WHERE organisation_id = \(organisationID)
              AND (\(action)::text IS NULL OR action = \(action))
              AND (\(targetID)::text IS NULL OR target_id = \(targetID))
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (occurred_at, id) < ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY occurred_at DESC, id DESC
            LIMIT \(limit + 1)
            """)
        var entries: [AuditEntry] = []
        for row in rows {
            let (id, at, actorType, actorID, action, targetType, targetID, before, after, requestID) =
                try row.decode(
                    (UUID, Date, ActorKind, UUID?, String, String, String?, JSONDocument<JSONValue>?, JSONDocument<JSONValue>?, String?)
                        .self, table: "audit_log")
            entries.append(
                AuditEntry(
                    id: id, occurredAt: at, actorType: actorType, actorID: actorID, action: action,
                    targetType: targetType, targetID: targetID, before: before?.value, after: after?.value, requestID: requestID))
        }
        return paginate(entries, limit: limit) { PageCursor(time: $0.occurredAt, id: $0.id) }
    }
}

/// Cuts the extra row fetched to know whether another page exists.
func paginate<Item>(_ items: [Item], limit: Int, cursor: (Item) -> PageCursor) -> Page<Item> {
    guard items.count > limit else { return Page(items: items, next: nil) }
    let page = Array(items.prefix(limit))
    return Page(items: page, next: page.last.map(cursor))
}
