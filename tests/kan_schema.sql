-- A Kan-shaped database: the tables, columns and enums of Kan's schema that
-- agent-identity relies on (column names camelCase, as Kan's Drizzle schema
-- writes them). Used by the tests and by examples/quickstart.py; not a copy
-- of Kan's full schema.

CREATE TYPE role AS ENUM ('admin', 'member', 'guest');
CREATE TYPE member_status AS ENUM ('invited', 'active', 'removed', 'paused');

CREATE TABLE "user" (
    "id" uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "name" varchar(255),
    "email" varchar(255) NOT NULL UNIQUE,
    "emailVerified" boolean NOT NULL DEFAULT false,
    "createdAt" timestamp NOT NULL DEFAULT now(),
    "updatedAt" timestamp
);

CREATE TABLE workspace (
    "id" bigserial PRIMARY KEY,
    "publicId" varchar(12) NOT NULL UNIQUE,
    "name" varchar(255) NOT NULL,
    "slug" varchar(255) NOT NULL UNIQUE,
    "createdBy" uuid REFERENCES "user"("id") ON DELETE SET NULL,
    "createdAt" timestamp NOT NULL DEFAULT now(),
    "deletedAt" timestamp
);

CREATE TABLE workspace_roles (
    "id" bigserial PRIMARY KEY,
    "publicId" varchar(12) NOT NULL UNIQUE,
    "workspaceId" bigint NOT NULL REFERENCES workspace("id") ON DELETE CASCADE,
    "name" varchar(64) NOT NULL,
    "hierarchyLevel" integer NOT NULL DEFAULT 0,
    "isSystem" boolean NOT NULL DEFAULT false
);

CREATE TABLE workspace_members (
    "id" bigserial PRIMARY KEY,
    "publicId" varchar(12) NOT NULL UNIQUE,
    "email" varchar(255) NOT NULL,
    "userId" uuid REFERENCES "user"("id") ON DELETE SET NULL,
    "workspaceId" bigint NOT NULL REFERENCES workspace("id") ON DELETE CASCADE,
    "createdBy" uuid NOT NULL REFERENCES "user"("id"),
    "createdAt" timestamp NOT NULL DEFAULT now(),
    "deletedAt" timestamp,
    "role" role NOT NULL DEFAULT 'member',
    "roleId" bigint REFERENCES workspace_roles("id") ON DELETE SET NULL,
    "status" member_status NOT NULL DEFAULT 'invited'
);

CREATE TABLE workspace_role_permissions (
    "workspaceRoleId" bigint NOT NULL REFERENCES workspace_roles("id") ON DELETE CASCADE,
    "permission" varchar(64) NOT NULL,
    "granted" boolean NOT NULL DEFAULT true,
    UNIQUE ("workspaceRoleId", "permission")
);

CREATE TABLE workspace_member_permissions (
    "workspaceMemberId" bigint NOT NULL REFERENCES workspace_members("id") ON DELETE CASCADE,
    "permission" varchar(64) NOT NULL,
    "granted" boolean NOT NULL,
    UNIQUE ("workspaceMemberId", "permission")
);

ALTER TABLE "user" ENABLE ROW LEVEL SECURITY;
ALTER TABLE workspace ENABLE ROW LEVEL SECURITY;
ALTER TABLE workspace_roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE workspace_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE workspace_role_permissions ENABLE ROW LEVEL SECURITY;
ALTER TABLE workspace_member_permissions ENABLE ROW LEVEL SECURITY;
