-- Seeds the demo ERP database used by examples/erp-docker.toml and the BROADSIDE_MSSQL_URL test.
-- Idempotent: re-running recreates the database. Generated, deterministic data: 1,000,000
-- customers with a share of invalid emails, NULLs and duplicates-by-case, like a real ERP.
IF DB_ID('BroadsideDemo') IS NOT NULL
BEGIN
    ALTER DATABASE BroadsideDemo SET SINGLE_USER WITH ROLLBACK IMMEDIATE;
    DROP DATABASE BroadsideDemo;
END;
GO
CREATE DATABASE BroadsideDemo;
GO
USE BroadsideDemo;
GO
CREATE TABLE dbo.Customers (
    CustomerId     int              NOT NULL PRIMARY KEY,
    AccountNumber  char(12)         NOT NULL,
    Email          nvarchar(320)    NULL,
    FirstName      nvarchar(100)    NULL,
    LastName       nvarchar(100)    NULL,
    Address1       nvarchar(200)    NULL,
    City           nvarchar(100)    NULL,
    State          char(2)          NULL,
    Zip            varchar(10)      NULL,
    Country        varchar(60)      NULL,
    Points         int              NULL,
    Balance        money            NULL,
    CreditLimit    decimal(12, 2)   NULL,
    Score          float            NULL,
    Active         bit              NOT NULL,
    BirthDate      date             NULL,
    CreatedAt      datetime2(3)     NOT NULL,
    UpdatedAt      datetimeoffset   NULL,
    ExternalId     uniqueidentifier NOT NULL
);
GO
-- A million rows from a digits cross join (no loops).
WITH d AS (SELECT n FROM (VALUES (0),(1),(2),(3),(4),(5),(6),(7),(8),(9)) AS v(n)),
     nums AS (
        SELECT a.n + 10*b.n + 100*c.n + 1000*e.n + 10000*f.n + 100000*g.n + 1 AS i
        FROM d a CROSS JOIN d b CROSS JOIN d c CROSS JOIN d e CROSS JOIN d f CROSS JOIN d g
     ),
     names AS (
        SELECT i,
               CHOOSE(i % 10 + 1, 'Ada', 'Grace', 'Edsger', 'Barbara', 'Alan', 'Donald', 'Frances', 'Ken', 'Radia', 'Tim') AS first,
               CHOOSE(i % 7 + 1, 'Lovelace', 'Hopper', 'Dijkstra', 'Liskov', 'Turing', 'Knuth', 'Allen') AS last
        FROM nums
     )
INSERT INTO dbo.Customers
SELECT i,
       'AC' + RIGHT('0000000000' + CAST(i AS varchar(10)), 10),
       CASE WHEN i % 97 = 0 THEN NULL
            WHEN i % 89 = 0 THEN LOWER(first) + '.' + LOWER(last) + CAST(i AS varchar(10)) + '.example.com'
            ELSE LOWER(first) + '.' + LOWER(last) + '.' + CAST(i AS varchar(10)) + '@example.com' END,
       first,
       CASE WHEN i % 113 = 0 THEN NULL ELSE last END,
       CAST(i % 9000 + 100 AS varchar(10)) + ' Main St',
       CHOOSE(i % 4 + 1, 'Boise', 'Albany', 'Austin', 'Denver'),
       CHOOSE(i % 4 + 1, 'ID', 'NY', 'TX', 'CO'),
       RIGHT('00000' + CAST(i % 99999 AS varchar(5)), 5),
       CASE WHEN i % 50 = 0 THEN 'Canada' ELSE 'US' END,
       i % 5000,
       CAST(i % 100000 AS money) / 100,
       CAST(i % 2000 AS decimal(12, 2)) * 10,
       (i % 1000) / 7.0,
       CASE WHEN i % 10 = 0 THEN 0 ELSE 1 END,
       DATEADD(day, -(i % 20000), CAST('2006-01-01' AS date)),
       DATEADD(second, i, CAST('2020-01-01T00:00:00' AS datetime2(3))),
       CASE WHEN i % 3 = 0 THEN NULL ELSE TODATETIMEOFFSET(DATEADD(minute, i, CAST('2024-01-01' AS datetime2)), '+02:00') END,
       NEWID()
FROM names;
GO
CREATE LOGIN broadside_reader WITH PASSWORD = 'Reader-Dev-1', CHECK_POLICY = OFF;
CREATE USER broadside_reader FOR LOGIN broadside_reader;
ALTER ROLE db_datareader ADD MEMBER broadside_reader;
GO
SELECT COUNT(*) AS customers FROM dbo.Customers;
GO
