import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import OpenAPIRuntime

/// The bell's two reads, the unread count and the first page of the default feed, answered in
/// ONE database statement each (`Database.bellFirstPage`, migration 0031) and written as JSON by
/// hand (`FeedJSON`), before the generated operation (issue 12: a feed read in one round trip).
///
/// Only an exact bell read takes this path: `GET /v1/me/notifications/unread-count` with no
/// query, or `GET /v1/me/notifications` with no query or only `limit` (1…200), called with a
/// user's access token and no body. Anything else, and any read the database does not admit (the
/// user gone, deactivated or without the operation's permission, or an engagement to record),
/// takes the general path, which answers with the same bytes or says why not. `BellReadsTests`
/// compares the two.
enum BellReads {
    enum Read: Equatable {
        case unreadCount
        case firstPage(limit: Int)
    }

    /// The bell read `request` is, if it is exactly one.
    static func read(operationID: String, request: HTTPRequest) -> Read? {
        // A GET with a body goes to the general path, whose contract checks refuse what it may hold.
        let bodiless = (request.headerFields[.contentLength] ?? "0") == "0" && request.headerFields[.transferEncoding] == nil
        guard request.method == .get, bodiless, acceptsJSON(request.headerFields[.accept]) else { return nil }
        let query = request.path?.split(separator: "?", maxSplits: 1).dropFirst().first
        switch operationID {
        case "getMyUnreadCount":
            return query == nil ? .unreadCount : nil
        case "listMyNotifications":
            guard let query else { return .firstPage(limit: PageSize.default) }
            let digits = query.dropFirst(6)
            guard query.hasPrefix("limit="), !digits.isEmpty, digits.utf8.allSatisfy({ (0x30...0x39).contains($0) }),
                let limit = Int(digits), (1...PageSize.maximum).contains(limit)
            else { return nil }
            return .firstPage(limit: limit)
        default:
            return nil
        }
    }

    /// The answer, or nil when the database did not admit the read (take the general path).
    static func answer(
        _ read: Read, for access: VerifiedAccess, permission: Permission, database: Database, now: Date
    ) async throws -> (HTTPResponse, HTTPBody?)? {
        let permission = permission.rawValue
        let json: String
        switch read {
        case .unreadCount:
            guard
                let count = try await database.bellUnreadCount(
                    organisationID: access.organisationID, userID: access.userID, now: now, permission: permission)
            else { return nil }
            json = FeedJSON.unreadCount(count)
        case .firstPage(let limit):
            guard
                let page = try await database.bellFirstPage(
                    organisationID: access.organisationID, userID: access.userID, now: now, limit: limit, permission: permission)
            else { return nil }
            json = FeedJSON.feedPage(page.items, next: page.next?.encoded)
        }
        let body = Array(json.utf8)
        return (HTTPResponse(status: .ok, headerFields: [.contentType: "application/json; charset=utf-8"]), HTTPBody(body))
    }

    /// What the generated operations accept: no `Accept`, or one that allows JSON. Anything else
    /// goes to the general path, which refuses it as the contract says.
    private static func acceptsJSON(_ accept: String?) -> Bool {
        guard let accept else { return true }
        return accept.split(separator: ",").contains { range in
            let type = range.split(separator: ";").first?.trimmingCharacters(in: .whitespaces).lowercased()
            return type == "application/json" || type == "*/*" || type == "application/*"
        }
    }
}
