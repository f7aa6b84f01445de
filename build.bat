@echo off
rem Build dist\chat_server.pyz and dist\chat_client.pyz on Windows: "build.bat" or "build.bat OUTDIR".
rem Run them with "py -3 dist\chat_server.pyz". The Python part is the one in build.sh, read from
rem between its BEGIN BUILDER and END BUILDER lines, so both scripts build the same bytes.
setlocal
set "OUT=%~1"
if "%OUT%"=="" set "OUT=%~dp0dist"
cd /d "%~dp0"
set "PY="
call :find_python py -3
if not defined PY call :find_python python
if not defined PY call :find_python python3
if not defined PY (
  echo build.bat: Python 3.8 or newer not found ^(tried py -3, python, python3^); install it from python.org>&2
  exit /b 1
)
%PY% -c "src = open('build.sh', encoding='utf-8').read(); exec(src.split('# BEGIN BUILDER\n')[1].split('# END BUILDER\n')[0])" "%OUT%"
exit /b %ERRORLEVEL%

rem PY=the command given when it runs a Python 3.8 or newer. The probe answers 38, a status that
rem neither a missing command (9009) nor an old Python (1) gives: "&&" after a command that does
rem not exist is not a safe test (Wine's cmd takes it as success), and Wine's "where" is a stub.
:find_python
%* -c "import sys; sys.exit(38 if sys.version_info >= (3, 8) else 1)" >nul 2>&1
if "%ERRORLEVEL%"=="38" set "PY=%*"
exit /b 0
